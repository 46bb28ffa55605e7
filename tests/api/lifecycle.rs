//! The process: `--help`, bad configuration (exit 2), a config file others may read (exit 2),
//! SIGTERM (exit 0 after a flush), and a restart that finds everything again.

use crate::helpers::{spawn_app, start};
use std::process::Command;

fn turnstile(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(args)
        .output()
        .expect("run turnstile")
}

#[test]
fn help_and_bad_configuration() {
    let help = turnstile(&["serve", "--help"]);
    assert!(help.status.success());
    // clap's generated help, on standard output.
    let text = String::from_utf8_lossy(&help.stdout);
    for option in [
        "--listen",
        "--data-dir",
        "--hold-ttl",
        "--webhook-secret",
        "--gateway-timeout",
        "--config",
        "--tls-cert",
        "--tls-min",
        "TURNSTILE_LISTEN",
        "[default: 15m]",
    ] {
        assert!(
            text.contains(option),
            "--help does not mention {option}:\n{text}"
        );
    }
    for bad in [
        &["serve", "--bogus", "1"][..],
        &["serve", "--hold-ttl", "soon"],
        &["launch"],
        &["serve", "--tls-cert", "cert.pem"],
        // Past 100 years a duration would overflow the milliseconds it becomes.
        &["serve", "--hold-ttl", "200000000000d"],
        &["serve", "--idempotency-retention", "106751991167d"],
        &["migrate"],
        &["gateway-sim", "--fail-5xx", "2"],
        &["serve", "--reconcile-after", "5s"],
        // Shorter than a checkout can take to decide: an answer could expire before its retry.
        &["serve", "--idempotency-retention", "1ns"],
        &["serve", "--order-retention", "5s"],
        &["serve", "--redis-optional"],
    ] {
        let output = turnstile(bad);
        assert_eq!(output.status.code(), Some(2), "{bad:?}");
        assert!(!output.stderr.is_empty());
    }

    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("turnstile.json");
    std::fs::write(&path, r#"{"listen": "127.0.0.1:0"}"#).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let output = turnstile(&["serve", "--config", path.to_str().expect("path")]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("chmod 600"));
}

#[test]
fn a_mysql_url_the_database_refuses_is_a_configuration_error() {
    // Proves: a wrong password or an unknown database is exit 2 with a message naming
    // --mysql-url (the operator must change it), never the password; a database that is merely
    // down stays a runtime failure.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("path");
    for url in [
        "mysql://root:not-the-password@127.0.0.1:3306/test",
        "mysql://root@127.0.0.1:3306/no_such_database_here",
    ] {
        for command in [
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data,
                "--mysql-url",
                url,
            ][..],
            &["migrate", "--mysql-url", url],
        ] {
            let output = turnstile(command);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{command:?}: {stderr}");
            assert!(stderr.contains("--mysql-url"), "{command:?}: {stderr}");
            assert!(!stderr.contains("not-the-password"), "{stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_a_restart_finds_everything() {
    let mut app = spawn_app(&[]);
    let mut client = app.client();
    client.put_product("R", 250, 7).await;
    let first = client
        .checkout("restart-1", "R", 2, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(first.status, 201);
    drop(client);
    let status = app.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM must end with exit 0");
    let (data_dir, _keep) = app.into_parts();

    let app = start(&data_dir, &[]);
    let mut client = app.client();
    assert_eq!(client.stock("R").await, (7, 5, 0, 2));
    let replay = client
        .checkout("restart-1", "R", 2, "tok_ok")
        .await
        .expect("answer");
    assert!(replay.replayed);
    assert_eq!(replay.body, first.body);
    assert_eq!(client.get("/healthz").await.status, 200);
    assert_eq!(client.get("/readyz").await.status, 200);
    let metrics = client.get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    for name in [
        "turnstile_http_requests_total",
        "turnstile_http_request_duration_seconds_bucket",
        "turnstile_journal_batch_records_bucket",
        "turnstile_journal_commit_seconds_bucket",
        "turnstile_reservations_total",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }
}
