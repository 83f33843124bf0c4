//! Config handling of both binaries: a bad config exits 64 and names what is wrong; a good
//! one passes `check-config`; the printed default config is a good one.

use std::path::Path;
use std::process::Output;

use pigeon_e2e::{
    GatewayConfig, Relay, TestDir, describe, gateway_bin, relay_bin, run_command, secs,
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
