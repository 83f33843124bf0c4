# Helpers for scripts that install pinned Debian packages and rustup targets, idempotently.
# Sourced by scripts/install-test-deps and scripts/install-cross-deps; the sourcing
# script defines say() first (it prefixes messages with the script's name).
#
#   deb PKG VERSION-GLOB      want Debian package PKG at a version matching the glob
#   rustup_target TRIPLE      want the Rust standard library for TRIPLE
#   tool NAME WANT CMD...     want CMD (a version command) to print WANT; if not, the
#                             sourcing script's install_NAME function installs it
#   install_missing           install what the calls above found missing (needs root)
#   report_missing            print what is missing; returns 1 if anything is
#
# `apt-get update` runs at most once, only when a Debian package must be installed.

DEB_MISSING=()    # "pkg=glob" specs still to install
RUSTUP_MISSING=() # target triples still to add
TOOL_MISSING=()   # tools still to install, each by its install_<name> function

deb() {
  local pkg=$1 glob=$2 have
  have=$(dpkg-query -W -f='${db:Status-Abbrev}${Version}' "$pkg" 2>/dev/null || true)
  if [[ $have == ii* ]]; then
    have=${have#ii }
    have=${have# }
    # shellcheck disable=SC2053 # GLOB is a pattern on purpose
    if [[ $have == $glob ]]; then
      return 0
    fi
    say "$pkg is at $have, want $glob"
  fi
  DEB_MISSING+=("$pkg=$glob")
}

rustup_target() {
  local triple=$1
  if rustc --print sysroot >/dev/null 2>&1 &&
    [[ -d "$(rustc --print sysroot)/lib/rustlib/$triple/lib" ]]; then
    return 0
  fi
  RUSTUP_MISSING+=("$triple")
}

tool() {
  local name=$1 want=$2 have
  shift 2
  have=$("$@" 2>/dev/null || true)
  if [[ $have == *"$want"* ]]; then
    return 0
  fi
  if [[ -n $have ]]; then
    say "$name is at ${have%%$'\n'*}, want $want"
  fi
  TOOL_MISSING+=("$name")
}

# quietly CMD...: runs CMD with its output in a log that is shown only if it fails.
quietly() {
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    say "failed: $*"
    return 1
  fi
  rm -f "$log"
}

report_missing() {
  local missing=("${DEB_MISSING[@]}" "${RUSTUP_MISSING[@]}" "${TOOL_MISSING[@]}")
  if ((${#missing[@]} == 0)); then
    say "everything is installed"
    return 0
  fi
  say "missing: ${missing[*]}"
  return 1
}

install_missing() {
  if ((${#DEB_MISSING[@]})); then
    say "apt-get update"
    quietly apt-get update
    say "apt-get install ${DEB_MISSING[*]}"
    # A package's own service (mosquitto.service on port 1883) may start or not; the
    # tests never use it: they start their own servers on free ports.
    quietly env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      "${DEB_MISSING[@]}"
  fi
  if ((${#RUSTUP_MISSING[@]})); then
    say "rustup target add ${RUSTUP_MISSING[*]}"
    quietly rustup target add "${RUSTUP_MISSING[@]}"
  fi
  local t
  for t in "${TOOL_MISSING[@]}"; do
    "install_$t"
  done
}
