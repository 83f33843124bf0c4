//! Black-box tests of the command line: config errors, subcommands, startup failures.

mod common;

use common::*;

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn an_unknown_config_key_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = Relay::config_text(free_port(), &dir.path().join("data"), "", "");
    for (text, key) in [
        (format!("listen_backlog = 5\n{base}"), "listen_backlog"),
        (format!("{base}\n[limits]\nmax_body = 3\n"), "max_body"),
        (base.replace("token = ", "tokn = "), "tokn"),
    ] {
        let path = write_config(dir.path(), &text);
        let (code, _, stderr) = run_bin(&["--config", &path, "check-config"]);
        assert_eq!(code, Some(64), "{stderr}");
        assert!(stderr.contains(key), "stderr does not name {key}: {stderr}");
        // `run` refuses it the same way, before binding anything.
        let (code, _, stderr) = run_bin(&["--config", &path]);
        assert_eq!(code, Some(64), "{stderr}");
        assert!(stderr.contains(key), "{stderr}");
    }
}

#[test]
fn an_invalid_value_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = Relay::config_text(free_port(), &dir.path().join("data"), "", "");
    let path = write_config(
        dir.path(),
        &format!("{base}\n[[gateways]]\nid = \"pi-1\"\ntoken = \"another-token-000000\"\n"),
    );
    let (code, _, stderr) = run_bin(&["--config", &path, "check-config"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("gateways[2].id"), "{stderr}");

    let path = write_config(dir.path(), "[sink]\nqueue_depth = 0\n");
    let (code, _, stderr) = run_bin(&["--config", &path, "check-config"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("sink.queue_depth"), "{stderr}");

    let (code, _, stderr) = run_bin(&["--config", "/nonexistent/relay.toml", "check-config"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("/nonexistent/relay.toml"), "{stderr}");
}

#[test]
fn the_printed_default_config_parses_back() {
    let (code, stdout, _) = run_bin(&["print-default-config"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("max_request_bytes = \"16MiB\""), "{stdout}");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &stdout);
    let (code, stdout, stderr) = run_bin(&["--config", &path, "check-config"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("127.0.0.1:8080"), "{stdout}");
}

#[test]
fn a_port_in_use_exits_1_with_a_clear_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &Relay::config_text(port, &dir.path().join("data"), "", ""),
    );
    let (code, _, stderr) = run_bin(&["--config", &path]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn an_unusable_data_dir_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // A plain file where the data dir should be: a bad config since d0dc013 (exit 64, so
    // systemd does not restart a relay that cannot work until someone fixes it).
    let data = dir.path().join("data");
    std::fs::write(&data, b"").unwrap();
    let path = write_config(dir.path(), &Relay::config_text(free_port(), &data, "", ""));
    let (code, _, stderr) = run_bin(&["--config", &path]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("data_dir"), "{stderr}");
    assert!(stderr.contains(&data.display().to_string()), "{stderr}");
}
