//! Config handling of both binaries: a bad config exits 64 and names what is wrong; a good
//! one passes `check-config`; the printed default config is a good one.

use std::path::{Path, PathBuf};
use std::process::Output;

use pigeon_e2e::{
    GatewayConfig, Mosquitto, Relay, TestDir, describe, gateway_bin, is_root, relay_bin,
    run_command, secs,
};

async fn run(bin: &Path, config: &Path, subcommand: Option<&str>) -> Output {
    let config = config.to_str().expect("UTF-8 temp path");
    let mut args = vec!["--config", config];
    args.extend(subcommand);
    run_command(bin, &args, secs(20)).await
}

fn gateway_config(dir: &TestDir) -> toml::Table {
    // Nothing listens on these ports: checking a config must not need the servers.
    GatewayConfig::new("pi-7", "t0ken", "http://127.0.0.1:9", 9).to_toml(&dir.join("gateway"))
}

fn table<'a>(t: &'a mut toml::Table, key: &str) -> &'a mut toml::Table {
    t.get_mut(key)
        .and_then(toml::Value::as_table_mut)
        .unwrap_or_else(|| panic!("no table {key}"))
}

/// Writes `config` with `edit` applied and checks that both `check-config` and `run`
/// refuse it with exit code 64, naming `key` on stderr.
async fn assert_refused(
    bin: &Path,
    dir: &TestDir,
    mut config: toml::Table,
    key: &str,
    edit: impl FnOnce(&mut toml::Table),
) {
    edit(&mut config);
    let path = dir.join(format!("bad-{key}.toml"));
    std::fs::write(&path, config.to_string()).unwrap();
    for sub in [Some("check-config"), Some("run"), None] {
        let out = run(bin, &path, sub).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(64) && stderr.contains(key),
            "{} {sub:?} with unknown key {key:?}: expected exit 64 and {key:?} on stderr, got {}",
            bin.display(),
            describe(&out)
        );
    }
}

#[tokio::test]
async fn gateway_refuses_unknown_keys_with_exit_64_naming_the_key() {
    let dir = TestDir::new("gateway-bad-config");
    let bin = gateway_bin();
    let base = gateway_config(&dir);
    assert_refused(&bin, &dir, base.clone(), "colour", |t| {
        table(t, "gateway").insert("colour".into(), "blue".into());
    })
    .await;
    assert_refused(&bin, &dir, base.clone(), "keepalive_interval", |t| {
        table(t, "mqtt").insert("keepalive_interval".into(), "30s".into());
    })
    .await;
    assert_refused(&bin, &dir, base.clone(), "retain_as_published", |t| {
        let subs = table(t, "mqtt")
            .get_mut("subscriptions")
            .and_then(toml::Value::as_array_mut)
            .unwrap();
        subs[0]
            .as_table_mut()
            .unwrap()
            .insert("retain_as_published".into(), true.into());
    })
    .await;
    assert_refused(&bin, &dir, base, "uplinkk", |t| {
        t.insert("uplinkk".into(), toml::Table::new().into());
    })
    .await;
}

#[tokio::test]
async fn gateway_refuses_a_value_of_the_wrong_type_naming_the_key() {
    let dir = TestDir::new("gateway-wrong-type");
    assert_refused(&gateway_bin(), &dir, gateway_config(&dir), "port", |t| {
        table(t, "mqtt").insert("port".into(), "eighteen-eighty-three".into());
    })
    .await;
}

#[tokio::test]
async fn gateway_refuses_a_token_file_it_cannot_read() {
    let dir = TestDir::new("gateway-token-file");
    let missing = dir.join("no-such-token");
    assert_refused(
        &gateway_bin(),
        &dir,
        gateway_config(&dir),
        "relay.token_file",
        |t| {
            let relay = table(t, "relay");
            relay.remove("token");
            relay.insert("token_file".into(), missing.display().to_string().into());
        },
    )
    .await;
}

#[tokio::test]
async fn gateway_check_config_accepts_a_good_config() {
    let dir = TestDir::new("gateway-good-config");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, gateway_config(&dir).to_string()).unwrap();
    let out = run(&gateway_bin(), &path, Some("check-config")).await;
    assert!(
        out.status.success(),
        "check-config refused a good config: {}",
        describe(&out)
    );
}

#[tokio::test]
async fn relay_refuses_unknown_keys_with_exit_64_naming_the_key() {
    let dir = TestDir::new("relay-bad-config");
    let base = Relay::config(9, &dir.join("relay"), &[("pi-1", "t0ken")]);
    assert_refused(&relay_bin(), &dir, base.clone(), "listen_backlog", |t| {
        t.insert("listen_backlog".into(), 5.into());
    })
    .await;
    assert_refused(&relay_bin(), &dir, base, "tokn", |t| {
        let gws = t
            .get_mut("gateways")
            .and_then(toml::Value::as_array_mut)
            .unwrap();
        gws[0]
            .as_table_mut()
            .unwrap()
            .insert("tokn".into(), "x".into());
    })
    .await;
}

#[tokio::test]
async fn relay_check_config_accepts_a_good_config() {
    let dir = TestDir::new("relay-good-config");
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        Relay::config(9, &dir.join("relay"), &[("pi-1", "t0ken")]).to_string(),
    )
    .unwrap();
    let out = run(&relay_bin(), &path, Some("check-config")).await;
    assert!(
        out.status.success(),
        "check-config refused a good config: {}",
        describe(&out)
    );
}

/// `print-default-config` prints TOML that `check-config` accepts once its directories
/// point somewhere writable.
async fn assert_default_config_checks(
    bin: &Path,
    dir: &TestDir,
    fix_dirs: impl FnOnce(&mut toml::Table),
) {
    let out = run_command(bin, &["print-default-config"], secs(20)).await;
    assert!(
        out.status.success(),
        "print-default-config failed: {}",
        describe(&out)
    );
    let text = String::from_utf8(out.stdout.clone()).expect("UTF-8 default config");
    let mut config: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("the default config is not TOML ({e}):\n{text}"));
    fix_dirs(&mut config);
    let path = dir.join("default.toml");
    std::fs::write(&path, config.to_string()).unwrap();
    let out = run(bin, &path, Some("check-config")).await;
    assert!(
        out.status.success(),
        "check-config refused the default config: {}",
        describe(&out)
    );
}

#[tokio::test]
async fn gateway_default_config_passes_check_config() {
    let dir = TestDir::new("gateway-default-config");
    let data = dir.join("gateway").display().to_string();
    assert_default_config_checks(&gateway_bin(), &dir, |t| {
        table(t, "gateway").insert("data_dir".into(), data.into());
        table(t, "relay").insert("token".into(), "issued-by-the-operator".into());
    })
    .await;
}

/// Installed and started without editing: refused at once, naming the key, rather than
/// retrying forever against a relay that answers 401.
#[tokio::test]
async fn gateway_refuses_the_default_configs_placeholder_token() {
    let dir = TestDir::new("gateway-placeholder-token");
    let out = run_command(&gateway_bin(), &["print-default-config"], secs(20)).await;
    let mut config: toml::Table = String::from_utf8(out.stdout).unwrap().parse().unwrap();
    let data = dir.join("gateway").display().to_string();
    table(&mut config, "gateway").insert("data_dir".into(), data.into());
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config.to_string()).unwrap();
    for command in [Some("check-config"), Some("run")] {
        let out = run(&gateway_bin(), &path, command).await;
        assert_eq!(
            out.status.code(),
            Some(64),
            "{command:?}: {}",
            describe(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("relay.token") && stderr.contains("change-me"),
            "{command:?} does not name the key and the placeholder: {stderr}"
        );
    }
}

#[tokio::test]
async fn relay_default_config_passes_check_config() {
    let dir = TestDir::new("relay-default-config");
    let data = dir.join("relay").display().to_string();
    assert_default_config_checks(&relay_bin(), &dir, |t| {
        t.insert("data_dir".into(), data.into());
    })
    .await;
}

/// `check-config` tells the person setting up the Pi whether the relay and the broker
/// answer now — a warning, not a refusal: the gateway buffers until they do.
#[tokio::test]
async fn gateway_check_config_says_whether_the_relay_and_the_broker_answer() {
    let dir = TestDir::new("gateway-check-reachability");
    let path = dir.join("gateway.toml");
    // Nothing listens on port 9 of either.
    std::fs::write(&path, gateway_config(&dir).to_string()).unwrap();
    let out = run(&gateway_bin(), &path, Some("check-config")).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stdout.contains("warning: relay http://127.0.0.1:9: not reachable now")
            && stdout.contains("warning: MQTT broker 127.0.0.1:9: not reachable now"),
        "{stdout}"
    );

    let mosquitto = Mosquitto::start(&dir).await;
    let relay = Relay::start(&dir, &[("pi-7", "t0ken")]).await;
    let config = GatewayConfig::new("pi-7", "t0ken", &relay.url(), mosquitto.port());
    std::fs::write(&path, config.to_toml(&dir.join("gateway")).to_string()).unwrap();
    let out = run(&gateway_bin(), &path, Some("check-config")).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stdout.contains(&format!("relay {}: reachable", relay.url()))
            && stdout.contains(&format!(
                "MQTT broker 127.0.0.1:{}: reachable",
                mosquitto.port()
            ))
            && !stdout.contains("warning"),
        "{stdout}"
    );
}

/// A data dir the service cannot write (or a file in its place) is a configuration
/// problem for both binaries: exit 64 naming the key, so systemd does not restart them
/// in a loop.
#[tokio::test]
async fn a_data_dir_the_service_cannot_use_is_refused_naming_the_key() {
    let dir = TestDir::new("data-dir-checks");
    let file = dir.join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let read_only = dir.join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    std::fs::set_permissions(
        &read_only,
        std::os::unix::fs::PermissionsExt::from_mode(0o555),
    )
    .unwrap();
    let cases = [
        (file.clone(), "is not a directory"),
        (file.join("below"), "is not a directory"),
        (read_only.join("data"), "cannot be created"),
    ];
    assert_data_dirs_refused(&dir, &cases, true).await;
}

/// Where root cannot write either — below `/proc`, on a read-only filesystem, on a full
/// one — both binaries refuse the data dir with exit 64 naming the key and the OS error,
/// for `check-config` as for `run`. access(2) lets root pass everywhere, so the check
/// tries (issue 24).
#[tokio::test]
async fn issue_24_a_data_dir_root_cannot_write_either_is_refused_naming_the_key() {
    let dir = TestDir::new("data-dir-root");
    let mut cases = vec![(
        PathBuf::from("/proc/pigeon-issue-24/data"),
        "cannot be created",
    )];
    let mut mounts = Vec::new();
    if is_root() {
        let ro = Tmpfs::mount(&dir.join("read-only-fs"), "size=1m,ro").await;
        let full = Tmpfs::mount(&dir.join("full-fs"), "size=64k").await;
        // Fill it: the last write fails for want of room.
        let mut f = std::fs::File::create(full.0.join("filler")).unwrap();
        while std::io::Write::write_all(&mut f, &[0; 4096]).is_ok() {}
        drop(f);
        cases.push((ro.0.clone(), "Read-only file system"));
        cases.push((ro.0.join("data"), "Read-only file system"));
        cases.push((full.0.clone(), "No space left on device"));
        cases.push((full.0.join("data"), "No space left on device"));
        mounts.extend([ro, full]);
    } else {
        eprintln!("SKIPPED: the read-only and full filesystems need root to mount");
    }
    assert_data_dirs_refused(&dir, &cases, false).await;
    drop(mounts);
}

/// A tmpfs mounted with `opts`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    async fn mount(at: &Path, opts: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let at_str = at.to_str().unwrap();
        let args = ["-t", "tmpfs", "-o", opts, "pigeon-test", at_str];
        let out = run_command(Path::new("mount"), &args, secs(10)).await;
        assert!(out.status.success(), "mount tmpfs: {}", describe(&out));
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Both binaries, with each data dir of `cases`, exit 64 for `check-config` and `run`
/// with a message naming the key, the dir and the expected problem; as the service user
/// (`nobody` when the tests run as root) when `as_service_user`, else as ourselves.
async fn assert_data_dirs_refused(dir: &TestDir, cases: &[(PathBuf, &str)], as_service_user: bool) {
    for (data_dir, expected) in cases {
        let mut gateway = gateway_config(dir);
        table(&mut gateway, "gateway")
            .insert("data_dir".into(), data_dir.display().to_string().into());
        let relay = Relay::config(9, data_dir, &[("pi-1", "t0ken")]);
        for (bin, config, key) in [
            (gateway_bin(), gateway, "gateway.data_dir"),
            (relay_bin(), relay, "data_dir"),
        ] {
            let path = dir.join("config.toml");
            std::fs::write(&path, config.to_string()).unwrap();
            for sub in ["check-config", "run"] {
                let out = if as_service_user {
                    run_as_service_user(&bin, &path, sub).await
                } else {
                    run(&bin, &path, Some(sub)).await
                };
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.code() == Some(64)
                        && stderr.contains(&format!("{key}: {}", data_dir.display()))
                        && stderr.contains(expected),
                    "{} {sub} with {key} = {}: {}",
                    bin.display(),
                    data_dir.display(),
                    describe(&out)
                );
            }
        }
    }
}

/// Runs `bin --config path sub` as an unprivileged user: as `nobody` when the tests run
/// as root (root may write anywhere), else as ourselves.
async fn run_as_service_user(bin: &Path, path: &Path, sub: &str) -> Output {
    if !is_root() {
        return run(bin, path, Some(sub)).await;
    }
    let (bin, path) = (bin.to_str().unwrap(), path.to_str().unwrap());
    let args = ["-u", "nobody", "--", bin, "--config", path, sub];
    run_command(Path::new("runuser"), &args, secs(20)).await
}
