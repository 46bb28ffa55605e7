//! The two runtimes: per-core workers (pinned, each with its own `SO_REUSEPORT` listener) and the
//! shared work-stealing one. The rest of the suite runs on whichever `TURNSTILE_RUNTIME` names
//! (README's test command runs it on both); these tests name theirs.

use crate::helpers::{eventually, start_with_env, Client, Load};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_workers_are_pinned_and_say_so_and_every_worker_serves() {
    // Proves: with --runtime per-core --pin, each worker logs where it was pinned (or that the
    // OS refused, and it went on); many connections spread over the workers' listeners all get
    // answers; and the stock sold over them is exactly what was asked.
    let dir = tempfile::tempdir().expect("tempdir");
    let app = start_with_env(
        &dir.path().join("data"),
        &["--runtime", "per-core", "--workers", "2", "--pin"],
        &[("RUST_LOG", "info")],
    );
    let mut client = app.client();
    assert_eq!(client.put_product("P", 100, 1_000).await.status, 200);
    let addr = app.addr;
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            tokio::spawn(async move {
                // A connection each: the kernel hashes each to one worker's listener.
                let mut client = Client::new(addr);
                let mut placed = 0;
                for n in 0..5 {
                    let answer = client
                        .checkout(&format!("rt-{i}-{n}"), "P", 1, "tok_ok")
                        .await
                        .expect("answer");
                    assert_eq!(
                        answer.status,
                        201,
                        "{}",
                        String::from_utf8_lossy(&answer.body)
                    );
                    placed += 1;
                }
                placed
            })
        })
        .collect();
    let mut placed = 0;
    for task in tasks {
        placed += task.await.expect("task");
    }
    assert_eq!(placed, 160);
    let (stock, available, reserved, sold) = client.stock("P").await;
    assert_eq!((stock, available, reserved, sold), (1_000, 840, 0, 160));
    let log = app.log();
    assert!(log.contains("per-core runtime"), "{log}");
    for worker in 0..2 {
        let said = |line: &&str| {
            line.contains(&format!("worker={worker}"))
                && (line.contains("worker pinned") || line.contains("pinning not permitted"))
        };
        assert!(
            log.lines().any(|line| said(&line)),
            "worker {worker}: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_port_the_per_core_one_holds_is_refused() {
    // Proves: SO_REUSEPORT does not let a second server share the first one's port unnoticed
    // (it would take a share of the connections): it fails to start, naming the address.
    let dir = tempfile::tempdir().expect("tempdir");
    let first = start_with_env(&dir.path().join("one"), &["--runtime", "per-core"], &[]);
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["serve", "--runtime", "per-core", "--listen"])
        .arg(first.addr.to_string())
        .arg("--data-dir")
        .arg(dir.path().join("two"))
        .output()
        .expect("run a second server");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains(&first.addr.to_string()), "{stderr}");
    let mut client = first.client();
    assert_eq!(client.get("/healthz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_runtimes_stop_cleanly_on_sigterm_with_requests_in_flight() {
    // Proves: on SIGTERM either runtime stops accepting, lets in-flight checkouts finish (each
    // answered 201 or refused a connection, never cut mid-answer), flushes the journal and exits
    // 0; a restart on the same data dir holds every order that was answered 201.
    for runtime in ["per-core", "shared"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut app = start_with_env(&data, &["--runtime", runtime], &[]);
        let mut client = app.client();
        assert_eq!(client.put_product("S", 100, 10_000).await.status, 200);
        let load = Load::start(&app, 8, runtime, &["S".to_owned()]);
        // SIGTERM once the load is well under way.
        eventually("200 orders placed", Duration::from_secs(30), async || {
            load.answered(Some(201)) >= 200
        })
        .await;
        app.send_sigterm();
        let status = app.wait();
        assert!(
            status.success(),
            "{runtime}: exit {status:?}: {}",
            app.log()
        );
        let ids: Vec<String> = load
            .stop()
            .await
            .into_iter()
            .filter(|sent| sent.status == 201)
            .map(|sent| sent.order_id)
            .collect();
        let restarted = start_with_env(&data, &["--runtime", runtime], &[]);
        let mut client = restarted.client();
        let (_, _, _, sold) = client.stock("S").await;
        assert_eq!(sold, ids.len() as i64, "{runtime}: sold equals the 201s");
        for id in ids.iter().step_by(97) {
            let order = client.get(&format!("/v1/orders/{id}")).await;
            assert_eq!(order.status, 200, "{runtime}: {id}");
        }
        eventually("readyz", Duration::from_secs(10), async || {
            client.get("/readyz").await.status == 200
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_ready_line_is_a_clean_stop() {
    // Proves: once "listening on" is printed, SIGTERM is handled (the journal flushed, exit 0),
    // on both runtimes: the handler is installed before the ready line, not after it.
    for runtime in ["per-core", "shared"] {
        for attempt in 0..15 {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut app = start_with_env(&dir.path().join("data"), &["--runtime", runtime], &[]);
            // SAFETY: a plain kill(2) of our own child.
            let sent = unsafe { libc::kill(app.pid() as libc::pid_t, libc::SIGTERM) };
            assert_eq!(sent, 0, "kill");
            let status = app.wait();
            assert!(
                status.success(),
                "{runtime}, attempt {attempt}: SIGTERM right after the ready line ended the server with {status:?}"
            );
        }
    }
}
