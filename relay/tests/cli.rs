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
    // A plain file where the data dir should be: only a person can fix that, so it is a
    // configuration error (systemd does not restart on 64), for check-config too.
    let data = dir.path().join("data");
    std::fs::write(&data, b"").unwrap();
    let path = write_config(dir.path(), &Relay::config_text(free_port(), &data, "", ""));
    for args in [
        vec!["--config", &path],
        vec!["--config", &path, "check-config"],
    ] {
        let (code, _, stderr) = run_bin(&args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("data_dir: "), "{stderr}");
        assert!(stderr.contains("is not a directory"), "{stderr}");
        assert!(stderr.contains(&data.display().to_string()), "{stderr}");
    }
}

/// A data dir nothing can be made in, by root neither: below `/proc`. access(2) lets root
/// pass there, so the check has to try; the message names the key and says what the OS
/// answered.
#[test]
fn issue_24_a_data_dir_root_cannot_write_either_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for data in ["/proc/pigeon-issue-24/data", "/proc/self/pigeon-data"] {
        let data = std::path::Path::new(data);
        let path = write_config(dir.path(), &Relay::config_text(free_port(), data, "", ""));
        for args in [
            vec!["--config", &path, "check-config"],
            vec!["--config", &path],
        ] {
            let (code, _, stderr) = run_bin(&args);
            assert_eq!(code, Some(64), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&format!("data_dir: {} cannot be created", data.display())),
                "{stderr}"
            );
            assert!(stderr.contains("os error"), "no OS error: {stderr}");
        }
    }
}
