//! The edges of the server: one process per data dir, and requests at the limits of the contract,
//! some sent over raw sockets because no well-behaved client would send them.

use crate::helpers::{spawn_app, start, JsonBody};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long a raw socket waits for the server in one read before the test gives up on it: far
/// longer than any answer here takes, so it only bounds a test that would otherwise hang.
const READ_WAIT: Duration = Duration::from_secs(5);

/// A raw connection whose reads wait at most [`READ_WAIT`].
fn raw(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(READ_WAIT))
        .expect("set the read timeout");
    stream
}

/// One answer read off a raw socket.
struct RawAnswer {
    status: u16,
    /// The status line and headers, lower-cased.
    head: String,
    body: Vec<u8>,
}

impl RawAnswer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {:?} after {}",
                String::from_utf8_lossy(&self.body),
                self.head
            )
        })
    }
}

/// Reads one HTTP/1.1 answer (its head, then a `Content-Length` body); `Err` if the server closed
/// the connection or sent nothing within [`READ_WAIT`].
fn read_answer(stream: &mut TcpStream) -> Result<RawAnswer, String> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(format!(
                    "closed after {:?}",
                    String::from_utf8_lossy(&bytes)
                ))
            }
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(error) => return Err(format!("no answer: {error}")),
        }
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let status = head
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(Ok(0), |value| value.trim().parse())
        .map_err(|e| format!("bad content-length in {head:?}: {e}"))?;
    while bytes.len() < head_end + length {
        match stream.read(&mut chunk) {
            Ok(0) => return Err("closed in the middle of the body".into()),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(error) => return Err(format!("body cut short: {error}")),
        }
    }
    Ok(RawAnswer {
        status,
        head,
        body: bytes[head_end..head_end + length].to_vec(),
    })
}

/// True when the server closes the connection (end of file or reset) within [`READ_WAIT`] of
/// each read; whatever it sends before closing is skipped. False when it keeps the connection
/// open and silent.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// True when the server sends nothing on `stream` for `wait` (and keeps it open).
fn silent_for(stream: &mut TcpStream, wait: Duration) -> bool {
    stream
        .set_read_timeout(Some(wait))
        .expect("set the read timeout");
    let mut byte = [0u8; 1];
    let silent = matches!(
        stream.read(&mut byte),
        Err(error) if matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    );
    stream
        .set_read_timeout(Some(READ_WAIT))
        .expect("set the read timeout");
    silent
}

/// `GET path` on a raw connection, answered.
fn raw_get(stream: &mut TcpStream, path: &str) -> RawAnswer {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: turnstile\r\n\r\n").expect("send");
    read_answer(stream).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

#[test]
fn a_second_server_on_a_data_dir_in_use_exits_2_naming_the_holder() {
    // Proves: a second `serve` on a data dir in use exits 2 naming the holder's pid, and once the
    // holder is killed with SIGKILL (its lock file left behind) a new server starts on the dir.
    let first = spawn_app(&[]);
    let mut second = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&first.data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the second turnstile");
    // The ready line, or end of file when the second one exits: a second server that starts is
    // killed here, so the test fails instead of hanging.
    let mut line = String::new();
    BufReader::new(second.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the second server's stdout");
    if !line.is_empty() {
        let _ = second.kill();
        let _ = second.wait();
        panic!("a second server started on a data dir in use: {line:?}");
    }
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read the second server's stderr");
    let status = second.wait().expect("wait for the second server");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("process {}", first.pid())),
        "the message must name the holder's pid {}: {stderr}",
        first.pid()
    );

    let (data_dir, _keep) = first.into_parts();
    assert!(data_dir.join("turnstile.lock").exists());
    let restarted = start(&data_dir, &[]);
    let health = raw_get(&mut raw(restarted.addr), "/healthz");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_after_or_limit_past_the_signed_64_bit_range_are_refused() {
    // Proves: `after` or `limit` of 2^63 or more gets `400 invalid_request` with the JSON error
    // shape, while 2^63 - 1, the largest signed 64-bit integer, is still a valid query.
    let app = spawn_app(&[]);
    let mut client = app.client();
    for query in [
        "after=9223372036854775808",
        "limit=9223372036854775808",
        "after=18446744073709551615",
        "after=1&limit=18446744073709551616",
    ] {
        let answer = client.get(&format!("/v1/events?{query}")).await;
        assert_eq!(answer.status, 400, "{query}");
        let json = answer.json();
        assert_eq!(json["error"], "invalid_request", "{query}: {json}");
        assert!(json["message"].is_string(), "{query}: {json}");
    }
    let largest = client
        .get("/v1/events?after=9223372036854775807&limit=9223372036854775807")
        .await;
    assert_eq!(largest.status, 200);
    let page = largest.json();
    assert_eq!(page["events"], serde_json::json!([]));
    assert_eq!(page["next"], 9_223_372_036_854_775_807_u64);
}

#[test]
fn slow_clients_are_cut_after_the_slow_client_timeout() {
    // Proves: with --slow-client-timeout 1s, a client that sends half a request line, or nothing
    // at all, is disconnected, and one whose body stops short of its Content-Length gets
    // `408 request_timeout` (JSON) and is disconnected: none of them holds its connection.
    let app = spawn_app(&["--slow-client-timeout", "1s"]);
    let mut half_line = raw(app.addr);
    half_line.write_all(b"POST /v1/chec").expect("send");
    let mut silent = raw(app.addr);
    let mut short_body = raw(app.addr);
    short_body
        .write_all(
            b"PUT /v1/products/slow HTTP/1.1\r\nHost: turnstile\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\": ",
        )
        .expect("send");

    assert!(
        closed_by_server(&mut half_line),
        "half a request line kept its connection"
    );
    assert!(
        closed_by_server(&mut silent),
        "a silent client kept its connection"
    );
    let answer = read_answer(&mut short_body).expect("an answer to the short body");
    assert_eq!(answer.status, 408);
    assert_eq!(answer.json()["error"], "request_timeout");
    assert!(answer.head.contains("connection: close"), "{}", answer.head);
    assert!(
        closed_by_server(&mut short_body),
        "the short body kept its connection"
    );
    // The server itself is unharmed.
    assert_eq!(raw_get(&mut raw(app.addr), "/healthz").status, 200);
}

#[test]
fn connections_past_the_maximum_wait_until_one_closes() {
    // Proves: with --connections-max 2, a third connection gets no answer while two idle
    // keep-alive connections are open, and is answered as soon as one of them closes.
    let app = spawn_app(&[
        "--connections-max",
        "2",
        // Long enough that no idle connection is closed by the server during the test.
        "--slow-client-timeout",
        "60s",
    ]);
    let mut first = raw(app.addr);
    let mut second = raw(app.addr);
    assert_eq!(raw_get(&mut first, "/healthz").status, 200);
    assert_eq!(raw_get(&mut second, "/healthz").status, 200);

    // The kernel completes the third connection in the listen backlog; the server does not take
    // it, so its request is not read.
    let mut third = raw(app.addr);
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: turnstile\r\n\r\n")
        .expect("send");
    assert!(
        silent_for(&mut third, Duration::from_secs(1)),
        "a third connection was served past --connections-max 2"
    );
    drop(first);
    let answer = read_answer(&mut third).expect("an answer once a connection closed");
    assert_eq!(answer.status, 200);
    // The second connection was never disturbed.
    assert_eq!(raw_get(&mut second, "/healthz").status, 200);
}

#[test]
fn a_del_byte_in_the_idempotency_key_gets_the_json_error() {
    // Proves: a DEL byte (0x7f) in the Idempotency-Key gets `400 invalid_request` with the JSON
    // error shape, not hyper's bare 400, also later on a keep-alive connection after a request
    // with a body; a DEL inside a JSON body still arrives as the client sent it; and a DEL key
    // after a good one is refused too (a checkout takes exactly one key).
    let app = spawn_app(&[]);
    let mut stream = raw(app.addr);
    let checkout_with_del_key = b"POST /v1/checkout HTTP/1.1\r\nHost: x\r\nIdempotency-Key: ab\x7fc\r\nContent-Length: 2\r\n\r\n{}";
    stream.write_all(checkout_with_del_key).expect("send");
    let answer = read_answer(&mut stream).expect("an answer to a DEL in the key");
    assert_eq!(answer.status, 400);
    let json = answer.json();
    assert_eq!(json["error"], "invalid_request", "{json}");
    assert!(
        json["message"]
            .as_str()
            .is_some_and(|m| m.contains("Idempotency-Key")),
        "{json}"
    );

    // The same connection: a body with a DEL in a JSON string, then the bad key again.
    let product = "{\"name\":\"a\u{7f}b\",\"price_cents\":100,\"currency\":\"EUR\",\"stock\":3}";
    write!(
        stream,
        "PUT /v1/products/del HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{product}",
        product.len()
    )
    .expect("send");
    let stored = read_answer(&mut stream).expect("an answer to the product");
    assert_eq!(
        stored.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&stored.body)
    );
    assert_eq!(stored.json()["name"], "a\u{7f}b");
    stream.write_all(checkout_with_del_key).expect("send");
    let again = read_answer(&mut stream).expect("an answer to the second DEL key");
    assert_eq!(again.status, 400);
    assert_eq!(again.json()["error"], "invalid_request");
    let product = raw_get(&mut stream, "/v1/products/del").json();
    assert_eq!(product["name"], "a\u{7f}b");

    // A DEL key does not slip through behind a good one.
    let body =
        r#"{"items":[{"sku":"del","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}"#;
    write!(
        stream,
        "POST /v1/checkout HTTP/1.1\r\nHost: x\r\nIdempotency-Key: good\r\nIdempotency-Key: b\x7fd\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let two_keys = read_answer(&mut stream).expect("an answer to two keys");
    assert_eq!(two_keys.status, 400);
    assert_eq!(two_keys.json()["error"], "invalid_request");
    let product = raw_get(&mut stream, "/v1/products/del").json();
    assert_eq!(product["reserved"], 0, "{product}");
    assert_eq!(product["sold"], 0, "{product}");
}

#[test]
fn a_stalled_http2_client_does_not_hold_the_shutdown() {
    // Proves: a client that opens an HTTP/2 connection and then stops answering (it never
    // acknowledges the server's pings) is cut off, so SIGTERM still ends the server, with exit 0.
    let mut app = spawn_app(&["--slow-client-timeout", "1s"]);
    let mut stalled = raw(app.addr);
    stalled
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .expect("send the preface and SETTINGS");
    // The server's SETTINGS frame: the connection is being served as HTTP/2.
    let mut frame_head = [0u8; 9];
    stalled
        .read_exact(&mut frame_head)
        .expect("the server's first frame");
    assert_eq!(frame_head[3], 0x4, "not a SETTINGS frame: {frame_head:?}");

    app.send_sigterm();
    assert!(
        closed_by_server(&mut stalled),
        "the stalled HTTP/2 connection was kept open after SIGTERM"
    );
    assert_eq!(app.wait().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_gives_its_place_back_after_the_slow_client_timeout() {
    // Proves: a client that keeps an HTTP/2 connection open without sending requests (it answers
    // pings, as any h2 client does) does not hold a place under --connections-max forever: the
    // connection is shut down gracefully once idle for --slow-client-timeout, and the next
    // client is served.
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let app = spawn_app(&["--connections-max", "1", "--slow-client-timeout", "1s"]);
    let stream = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let (mut idle, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    let idle_connection = tokio::spawn(connection);
    let request = || {
        hyper::Request::get("http://127.0.0.1/healthz")
            .body(Empty::<Bytes>::new())
            .expect("request")
    };
    let first = idle.send_request(request()).await.expect("first request");
    assert_eq!(first.status(), 200);
    let _ = first.into_body().collect().await;
    // The only place is taken; the server closes the idle connection by itself, and the
    // connection task ends (bounded here so a regression fails instead of hanging).
    let ended = tokio::time::timeout(Duration::from_secs(30), idle_connection).await;
    assert!(ended.is_ok(), "the idle HTTP/2 connection was never closed");
    // Its place is free again: a new client is served.
    let mut client = app.client();
    assert_eq!(client.get("/healthz").await.status, 200);
}

#[test]
fn a_backlog_above_somaxconn_and_a_file_limit_below_connections_max_are_said_at_start() {
    // Proves: the server says at start where the kernel allows less than it is configured for — a
    // --listen-backlog above net.core.somaxconn, a file limit below --connections-max + 1000 —
    // naming the setting to raise, and serves all the same; with both in reach it says neither.
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("read net.core.somaxconn")
        .trim()
        .parse()
        .expect("somaxconn");
    let files = Command::new("sh")
        .args(["-c", "ulimit -n"])
        .output()
        .expect("ulimit -n");
    // "unlimited" leaves nothing to fall short of: the file limit's part is then not checked.
    let files: Option<u64> = String::from_utf8_lossy(&files.stdout).trim().parse().ok();
    let over_backlog = (somaxconn + 1).to_string();
    let over_files = files.unwrap_or(64).min(1_000_000).to_string();
    let app = spawn_app(&[
        "--listen-backlog",
        &over_backlog,
        "--connections-max",
        &over_files,
    ]);
    assert_eq!(raw_get(&mut raw(app.addr), "/healthz").status, 200);
    let log = app.log();
    assert!(
        log.contains("net.core.somaxconn") && log.contains(&format!("somaxconn={somaxconn}")),
        "{log}"
    );
    if let Some(files) = files.filter(|&files| files <= 1_000_000) {
        assert!(
            log.contains("ulimit -n") && log.contains(&format!("file_limit={files}")),
            "{log}"
        );
    }

    let quiet = spawn_app(&["--listen-backlog", "16", "--connections-max", "64"]);
    assert_eq!(raw_get(&mut raw(quiet.addr), "/healthz").status, 200);
    let log = quiet.log();
    assert!(
        !log.contains("somaxconn") && !log.contains("file limit"),
        "{log}"
    );
}
