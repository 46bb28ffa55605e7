//! The server never shows what is not durable: on a full disk a checkout or a stock change that
//! answered 503 leaves nothing behind (no order, no units, no stock, no event, its key free), the
//! server says why it is not ready, keeps `/healthz` at 200, and recovers by itself once the disk
//! has room again.

use crate::helpers::{eventually, start, Answer, Client, JsonBody, SmallDisk};
use std::time::Duration;

/// A paid checkout of one tee under `key`.
async fn checkout(client: &mut Client, key: &str) -> Answer {
    client
        .checkout(key, "tee", 1, "tok_ok")
        .await
        .unwrap_or_else(|e| panic!("checkout {key}: {e}"))
}

#[tokio::test]
async fn a_full_disk_changes_nothing_visible_and_the_server_recovers_by_itself() {
    let disk = SmallDisk::mount(4);
    // The data dir is the small disk itself; the server's log lands beside it, on a disk with room.
    let data_dir = disk.mount.clone();
    let mut app = start(&data_dir, &["--journal-timeout", "2s"]);
    let mut client = app.client();
    assert_eq!(client.put_product("tee", 1999, 1_000_000).await.status, 200);

    let filler = disk.fill(8 * 1024);
    let mut placed = 0;
    let mut refused_key = None;
    for i in 0..10_000 {
        let key = format!("k-{i}");
        let answer = checkout(&mut client, &key).await;
        match answer.status {
            201 => placed += 1,
            503 => {
                let body = answer.json();
                assert_eq!(body["error"], "journal_unavailable", "{body}");
                assert!(answer.retry_after.is_some(), "a 503 says when to retry");
                refused_key = Some(key);
                break;
            }
            other => panic!(
                "unexpected {other}: {}",
                String::from_utf8_lossy(&answer.body)
            ),
        }
    }
    let refused_key = refused_key.expect("the disk filled up");

    // Nothing of the refused checkout is visible: the units, the events, the key.
    let (stock, _, reserved, sold) = client.stock("tee").await;
    assert_eq!((stock, reserved, sold), (1_000_000, 0, placed));
    let paid_events = client
        .all_events()
        .await
        .iter()
        .filter(|e| e["type"] == "order.paid")
        .count() as i64;
    assert_eq!(paid_events, placed);
    // A stock change the journal refused is not served either.
    let put = client
        .send(
            "PUT",
            "/v1/products/tee",
            &[],
            r#"{"name":"tee","price_cents":1999,"currency":"EUR","stock":2000000}"#,
        )
        .await;
    assert_eq!(put.status, 503, "{}", String::from_utf8_lossy(&put.body));
    assert_eq!(client.stock("tee").await.0, 1_000_000);
    // The server says why it is not ready, and is alive.
    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 503);
    let checks = ready.json();
    assert_eq!(checks["ready"], false);
    assert_ne!(checks["checks"]["journal"], "ok", "{checks}");
    assert_eq!(client.get("/healthz").await.status, 200);

    // Room again: the server recovers by itself, and the refused key places its order once.
    std::fs::remove_file(&filler).expect("free the disk");
    eventually(
        "the journal to recover",
        Duration::from_secs(15),
        async || client.get("/readyz").await.status == 200,
    )
    .await;
    let retried = checkout(&mut client, &refused_key).await;
    assert_eq!(retried.status, 201);
    assert_eq!(client.stock("tee").await.3, placed + 1);

    // A restart reads exactly what was acknowledged.
    app.kill_9();
    let app = start(&data_dir, &[]);
    let mut client = app.client();
    let (_, _, reserved, sold) = client.stock("tee").await;
    assert_eq!((reserved, sold), (0, placed + 1));
    let replay = checkout(&mut client, &refused_key).await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.json(), retried.json());
    drop(client);
    drop(app);
}
