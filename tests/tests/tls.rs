//! HTTPS between gateway and relay, with certificates made by the real `openssl`:
//!
//! * the relay terminates TLS itself (`[tls]`); a gateway that trusts the relay's CA
//!   (`relay.ca_file`) and presents a client certificate (CN = its id, signed by the
//!   relay's `tls.client_ca`) delivers its readings without any token, each exactly once;
//!   certificates of no configured gateway, of another CA, or contradicting the token are
//!   refused, and a client that does not trust the relay's CA cannot connect;
//! * the relay's certificate is replaced on disk by one of another CA and served without
//!   a restart, while a gateway keeps delivering; a renewal that leaves a mismatched key
//!   is refused and the previous certificate stays in use;
//! * unreadable certificate files stop either program at start with exit 64 and a
//!   message naming the key.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use pigeon_e2e::{
    CertFiles, Gateway, GatewayConfig, Mosquitto, Publisher, Relay, TestCa, TestDir, Token,
    climate_readings, curl_get, replace_file, secs, wait_until,
};

fn tls_table(server: &CertFiles, client_ca: Option<&Path>) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("cert".into(), server.cert.display().to_string().into());
    t.insert("key".into(), server.key.display().to_string().into());
    if let Some(ca) = client_ca {
        t.insert("client_ca".into(), ca.display().to_string().into());
    }
    t.insert("reload_check".into(), "1s".into());
    t
}

/// Adds `[[gateways]]` entries without a token: identified by certificate only.
fn add_certificate_gateways(t: &mut toml::Table, ids: &[&str]) {
    let gws = t
        .get_mut("gateways")
        .and_then(|g| g.as_array_mut())
        .expect("the harness writes [[gateways]]");
    for id in ids {
        let mut g = toml::Table::new();
        g.insert("id".into(), (*id).into());
        gws.push(g.into());
    }
}

fn gateway_tls(c: &mut GatewayConfig, ca: &Path, client: Option<&CertFiles>) {
    let r = &mut c.relay_options;
    r.insert("ca_file".into(), ca.display().to_string().into());
    if let Some(client) = client {
        r.insert(
            "client_cert".into(),
            client.cert.display().to_string().into(),
        );
        r.insert("client_key".into(), client.key.display().to_string().into());
    }
}

/// `curl` POST of an empty batch to the ingest endpoint with `args` (certificates,
/// headers): the status and body, or curl's error.
async fn post_events(relay: &Relay, args: &[&str]) -> Result<(u16, String), String> {
    let mut all = vec![
        "-X",
        "POST",
        "-H",
        "Content-Type: application/cloudevents-batch+json",
        "--data",
        "[]",
    ];
    all.extend_from_slice(args);
    curl_get(&all, &format!("{}/v1/events", relay.url())).await
}

fn strs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_a_client_certificate_delivers_over_https_without_a_token() {
    const N: u64 = 300;
    let dir = TestDir::new("tls-mtls");
    let pki = dir.join("pki");
    let server_ca = TestCa::new(&pki, "server-ca");
    let server = server_ca.server("relay");
    let client_ca = TestCa::new(&pki, "gateway-ca");
    let rogue_ca = TestCa::new(&pki, "rogue-ca");
    let ca_path = client_ca.files.cert.clone();
    let mosquitto = Mosquitto::start(&dir).await;
    let relay = Relay::start_with(&dir, &[("pi-token", "a-long-token-for-tls-00001")], |t| {
        add_certificate_gateways(t, &["pi-cert"]);
        t.insert("tls".into(), tls_table(&server, Some(&ca_path)).into());
    })
    .await;
    assert!(relay.url().starts_with("https://"));

    let mine = client_ca.client("pi-cert");
    let mut config = GatewayConfig::new("pi-cert", "", &relay.url(), mosquitto.port());
    config.token = Token::None;
    gateway_tls(&mut config, &server_ca.files.cert, Some(&mine));
    let _gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;
    let published = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(0..N),
        Default::default(),
        secs(60),
    )
    .await;
    published.assert_all_acked(N as usize);
    let stream = relay
        .assert_delivered_exactly_once(&published.acked, secs(60))
        .await;
    for e in stream.events() {
        assert_eq!(e["source"], "/gateways/pi-cert/mqtt", "{e}");
    }

    let ca = server_ca.files.cert.to_str().unwrap();
    let with = |c: &CertFiles| -> [String; 6] {
        [
            "--cacert".into(),
            ca.into(),
            "--cert".into(),
            c.cert.display().to_string(),
            "--key".into(),
            c.key.display().to_string(),
        ]
    };

    // A certificate of the right CA for a gateway the relay does not know: 403, named.
    let stranger = client_ca.client("pi-stranger");
    let stranger_args = with(&stranger);
    let (code, body) = post_events(&relay, &strs(&stranger_args)).await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("pi-stranger"), "{body}");
    // pi-cert's certificate with pi-token's token: they contradict each other.
    let mine_args = with(&mine);
    let mut args = strs(&mine_args);
    args.extend(["-H", "Authorization: Bearer a-long-token-for-tls-00001"]);
    let (code, body) = post_events(&relay, &args).await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("pi-cert"), "{body}");
    // A certificate of another CA does not get through the handshake.
    let rogue = rogue_ca.client("pi-cert");
    let rogue_args = with(&rogue);
    let e = post_events(&relay, &strs(&rogue_args)).await.unwrap_err();
    assert!(e.contains("curl"), "{e}");
    // Without a certificate, the token still identifies its gateway (client_auth is
    // optional), and no token is a 401.
    let (code, body) = post_events(
        &relay,
        &[
            "--cacert",
            ca,
            "-H",
            "Authorization: Bearer a-long-token-for-tls-00001",
        ],
    )
    .await
    .unwrap();
    assert_ne!(code, 401, "{body}");
    assert_ne!(code, 403, "{body}");
    let (code, _) = post_events(&relay, &["--cacert", ca]).await.unwrap();
    assert_eq!(code, 401);
    // A client that trusts only the system's CAs refuses the relay.
    let e = curl_get(&[], &format!("{}/ready", relay.url()))
        .await
        .unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    assert!(
        relay
            .metric_or_zero("pigeon_relay_tls_handshake_errors_total")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = TestDir::new("tls-reload");
    let pki = dir.join("pki");
    let old_ca = TestCa::new(&pki, "old-ca");
    let new_ca = TestCa::new(&pki, "new-ca");
    let live = CertFiles {
        cert: pki.join("live.crt"),
        key: pki.join("live.key"),
    };
    let first = old_ca.server("relay");
    replace_file(&first.cert, &live.cert);
    replace_file(&first.key, &live.key);
    // The gateway trusts both CAs, as during a planned CA change.
    let bundle = pki.join("bundle.crt");
    let mut both = std::fs::read(&old_ca.files.cert).unwrap();
    both.extend(std::fs::read(&new_ca.files.cert).unwrap());
    std::fs::write(&bundle, both).unwrap();

    let mosquitto = Mosquitto::start(&dir).await;
    let token = "a-long-token-for-tls-00002";
    let relay = Relay::start_with(&dir, &[("pi-1", token)], |t| {
        t.insert("tls".into(), tls_table(&live, None).into());
    })
    .await;
    let ready = |ca: &Path| {
        let (ca, url) = (ca.display().to_string(), format!("{}/ready", relay.url()));
        async move { curl_get(&["--cacert", &ca], &url).await }
    };
    assert_eq!(ready(&old_ca.files.cert).await.map(|r| r.0), Ok(200));
    assert!(ready(&new_ca.files.cert).await.is_err());
    let expiry = "pigeon_relay_tls_certificate_expiry_timestamp_seconds";
    let first_expiry = relay.metric_or_zero(expiry).await;
    assert!(first_expiry > 1.7e9, "{first_expiry}");

    let mut config = GatewayConfig::new("pi-1", token, &relay.url(), mosquitto.port());
    gateway_tls(&mut config, &bundle, None);
    let _gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;
    let before = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(0..100),
        Default::default(),
        secs(60),
    )
    .await;
    relay.wait_for_readings("n", &before.acked, secs(60)).await;

    // A renewal: key first, then the certificate. In between the pair does not match;
    // whichever the relay sees, it must end up serving the new pair.
    let renewed = new_ca.server("relay");
    replace_file(&renewed.key, &live.key);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    replace_file(&renewed.cert, &live.cert);
    wait_until("the new certificate served", secs(20), || async {
        ready(&new_ca.files.cert)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    assert!(ready(&old_ca.files.cert).await.is_err());
    assert!(relay.metric_or_zero("pigeon_relay_tls_reloads_total").await >= 1.0);

    // A broken renewal (a key of another certificate) is refused; the relay keeps
    // serving the pair that works.
    let stray = new_ca.server("other");
    let errors = "pigeon_relay_tls_reload_errors_total";
    let errors_before = relay.metric_or_zero(errors).await;
    replace_file(&stray.key, &live.key);
    wait_until("the bad key refused", secs(20), || async {
        let n = relay.metric_or_zero(errors).await;
        if n > errors_before {
            Ok(())
        } else {
            Err(format!("{errors} = {n}"))
        }
    })
    .await;
    assert_eq!(ready(&new_ca.files.cert).await.map(|r| r.0), Ok(200));
    let mut relay_log = String::new();
    for _ in 0..20 {
        relay_log = std::fs::read_to_string(dir.log_file("relay")).unwrap_or_default();
        if relay_log.contains("still serving the previous certificate") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        relay_log.contains("still serving the previous certificate"),
        "{relay_log}"
    );

    // The gateway delivered across the change, each reading once.
    let after = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(100..200),
        Default::default(),
        secs(60),
    )
    .await;
    let all: BTreeSet<u64> = before.acked.union(&after.acked).copied().collect();
    relay.assert_delivered_exactly_once(&all, secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_certificate_files_stop_the_start_with_exit_64() {
    let dir = TestDir::new("tls-bad-files");
    let pki = dir.join("pki");
    let ca = TestCa::new(&pki, "ca");
    let a = ca.server("a");
    let b = ca.server("b");

    // The relay: a key that is not the certificate's.
    let config = dir.join("relay-bad.toml");
    let mut t = Relay::config(pigeon_e2e::free_port(), &dir.join("relay-bad"), &[]);
    let mismatched = CertFiles {
        cert: a.cert.clone(),
        key: b.key.clone(),
    };
    t.insert("tls".into(), tls_table(&mismatched, None).into());
    std::fs::write(&config, t.to_string()).unwrap();
    let out = tokio::process::Command::new(pigeon_e2e::relay_bin())
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("tls.cert and tls.key do not belong together"),
        "{err}"
    );

    // The gateway: a CA file that is no certificate.
    let not_pem = pki.join("not-a-ca.crt");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let mut c = GatewayConfig::new(
        "pi-1",
        "a-long-token-for-tls-00003",
        "https://127.0.0.1:9",
        1,
    );
    c.mqtt_enabled = false;
    gateway_tls(&mut c, &not_pem, None);
    let mut gateway = Gateway::start(&dir, c);
    let status = gateway
        .wait_exit(secs(20))
        .await
        .expect("the gateway exits");
    assert_eq!(status.code(), Some(64), "{}", gateway.log_text());
    assert!(
        gateway.log_text().contains("relay.ca_file"),
        "{}",
        gateway.log_text()
    );
}
