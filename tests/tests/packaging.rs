//! The packaging files agree with each other and with the binaries: each systemd unit in
//! `systemd/` runs the binary the .deb installs (`[package.metadata.deb]`) with the
//! conffile the .deb installs; that conffile's `data_dir` is the unit's StateDirectory;
//! and the relay's conffile is exactly its `print-default-config` but for `data_dir`.

use std::path::{Path, PathBuf};

use pigeon_e2e::{relay_bin, run_command, secs};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

fn read(rel: &str) -> String {
    let path = workspace().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of `key=` in a unit file; the last one wins, as in systemd.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .trim()
        .to_owned()
}

/// The .deb assets of a crate as (source, destination) pairs.
fn deb_assets(crate_dir: &str) -> Vec<(String, String)> {
    let manifest: toml::Table = read(&format!("{crate_dir}/Cargo.toml")).parse().unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .expect("[package.metadata.deb] assets");
    assets
        .iter()
        .map(|a| {
            let a = a.as_array().expect("an asset is [source, dest, mode]");
            let s = |i: usize| a[i].as_str().expect("a string").to_owned();
            (s(0), s(1))
        })
        .collect()
}

/// Checks the unit of `binary` against its crate's .deb metadata and returns the
/// packaged config file's text.
fn check_unit_and_package(crate_dir: &str, binary: &str) -> String {
    let unit = read(&format!("systemd/{binary}.service"));
    let assets = deb_assets(crate_dir);

    let exec = unit_value(&unit, "ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    let [program, "--config", config, "run"] = args[..] else {
        panic!("{binary}.service: ExecStart={exec} is not `/usr/bin/{binary} --config FILE run`");
    };
    assert_eq!(program, format!("/usr/bin/{binary}"));
    assert!(
        assets.contains(&(format!("target/release/{binary}"), "usr/bin/".to_owned())),
        "{crate_dir}/Cargo.toml does not install {binary} into /usr/bin: {assets:?}"
    );
    let (source, _) = assets
        .iter()
        .find(|(_, dest)| format!("/{dest}") == config)
        .unwrap_or_else(|| panic!("the .deb installs nothing at {config}: {assets:?}"));

    let text = read(&format!("{crate_dir}/{source}"));
    let parsed: toml::Table = text.parse().unwrap();
    let data_dir = parsed
        .get("gateway")
        .and_then(|g| g.get("data_dir"))
        .or_else(|| parsed.get("data_dir"))
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("{source} sets no data_dir"));
    let state = unit_value(&unit, "StateDirectory");
    assert_eq!(
        Path::new(data_dir),
        Path::new("/var/lib").join(&state),
        "{source}'s data_dir is not {binary}.service's StateDirectory={state}"
    );
    text
}

#[test]
fn gateway_unit_package_and_default_config_agree() {
    check_unit_and_package("gateway", "pigeon-gateway");
}

#[tokio::test]
async fn relay_unit_package_and_default_config_agree() {
    let packaged = check_unit_and_package("relay", "pigeon-relay");

    let out = run_command(&relay_bin(), &["print-default-config"], secs(20)).await;
    assert!(out.status.success(), "print-default-config: {out:?}");
    let default = String::from_utf8(out.stdout).unwrap();
    let relative = "data_dir = \"./pigeon-relay-data\"";
    assert!(
        default.contains(relative),
        "the relay's default data_dir changed; update relay/debian/relay.toml and this test"
    );
    let expected = default.replace(relative, "data_dir = \"/var/lib/pigeon-relay\"");
    assert!(
        packaged == expected,
        "relay/debian/relay.toml is not the default config with data_dir = \"/var/lib/pigeon-relay\"; \
         regenerate it:\n  target/debug/pigeon-relay print-default-config | \
         sed 's|^data_dir = \"./pigeon-relay-data\"$|data_dir = \"/var/lib/pigeon-relay\"|' \
         > relay/debian/relay.toml"
    );
}
