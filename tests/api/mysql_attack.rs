//! Attacks on the MySQL journal through a TCP proxy the test controls (MariaDB itself is never
//! stopped): a network that goes silent mid-transaction, a connection lost right after COMMIT.

use crate::helpers::{spawn_app, wait_projected, TestDatabase, MARIADB_ADDR};
use sqlx::Row;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A proxy in front of MariaDB.
pub struct Proxy {
    pub port: u16,
    /// While set, nothing is forwarded (either way) and new connections hang: a black hole.
    silent: Arc<AtomicBool>,
    /// While set, the next COMMIT a client sends reaches the server, then the connection is cut
    /// before the answer comes back, and the next `refuse_after_commit` connections are cut at once.
    cut_after_commit: Arc<AtomicBool>,
    refuse: Arc<AtomicUsize>,
    /// Connections cut after a COMMIT so far.
    cuts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn is_commit(bytes: &[u8]) -> bool {
    // A MySQL packet: 3 bytes length (7), 1 byte seq, then COM_QUERY (0x03) and "COMMIT".
    bytes
        .windows(11)
        .any(|w| w[..3] == [7, 0, 0] && w[4] == 0x03 && w[5..].eq_ignore_ascii_case(b"COMMIT"))
}

impl Proxy {
    pub async fn start(refuse_after_commit: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let silent = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let refuse = Arc::new(AtomicUsize::new(0));
        let (s, c, r) = (Arc::clone(&silent), Arc::clone(&cut), Arc::clone(&refuse));
        let (kill_all, killed) = tokio::sync::watch::channel(0u64);
        let cuts = Arc::new(AtomicUsize::new(0));
        let cuts2 = Arc::clone(&cuts);
        let kill_all = Arc::new(kill_all);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if r.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
                {
                    drop(client);
                    continue;
                }
                let (s, c, r) = (Arc::clone(&s), Arc::clone(&c), Arc::clone(&r));
                let kill_all = Arc::clone(&kill_all);
                let cuts = Arc::clone(&cuts2);
                let mut killed = killed.clone();
                // Only kills from now on concern this connection.
                killed.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(MARIADB_ADDR).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let s2 = Arc::clone(&s);
                    // Set once the COMMIT to lose has gone up: the server's answer to it is the
                    // proof it committed, and is swallowed.
                    let muted = Arc::new(AtomicBool::new(false));
                    let muted2 = Arc::clone(&muted);
                    let answered = Arc::new(tokio::sync::Notify::new());
                    let answered2 = Arc::clone(&answered);
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if s.load(Ordering::Acquire) {
                                // A black hole from now on (silence is never lifted).
                                std::future::pending::<()>().await;
                            }
                            let bytes = &buf[..n];
                            let commit = is_commit(bytes) && c.swap(false, Ordering::AcqRel);
                            let answer = answered.notified();
                            if commit {
                                muted.store(true, Ordering::Release);
                            }
                            if sw.write_all(bytes).await.is_err() {
                                return;
                            }
                            if commit {
                                // The server answered: it committed. Lose the answer, cut every
                                // connection, refuse the next ones.
                                answer.await;
                                r.store(refuse_after_commit, Ordering::Release);
                                cuts.fetch_add(1, Ordering::AcqRel);
                                kill_all.send_modify(|g| *g += 1);
                                return;
                            }
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if s2.load(Ordering::Acquire) {
                                std::future::pending::<()>().await;
                            }
                            if muted2.load(Ordering::Acquire) {
                                answered2.notify_one();
                                continue;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Either direction ending ends the connection (both halves dropped).
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = killed.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            silent,
            cut_after_commit: cut,
            refuse,
            cuts,
            task,
        }
    }

    /// The database's URL through this proxy.
    pub fn url(&self, database: &TestDatabase) -> String {
        // Plain text, so the proxy can see the statements.
        database
            .url
            .replace(MARIADB_ADDR, &format!("127.0.0.1:{}", self.port))
            + "?ssl-mode=disabled"
    }

    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::Release);
    }

    pub fn cut_after_next_commit(&self) {
        self.cut_after_commit.store(true, Ordering::Release);
    }

    pub fn refused_left(&self) -> usize {
        self.refuse.load(Ordering::Acquire)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_in_bounded_time_when_mysql_goes_silent_mid_commit() {
    // Proves (or refutes): the MySQL network going silent (no RST, no answer: a partition) while
    // the writer waits for a statement's answer does not keep SIGTERM from ending the server.
    let database = TestDatabase::create().await;
    let proxy = Proxy::start(0).await;
    let url = proxy.url(&database);
    let mut app = spawn_app(&["--mysql-url", &url, "--journal-timeout", "1s"]);
    let mut client = app.client();
    assert_eq!(client.put_product("H", 100, 10).await.status, 200);
    proxy.go_silent();
    let answer = client
        .checkout("silent-1", "H", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(
        answer.status,
        503,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let started = Instant::now();
    app.send_sigterm();
    // Waits for the process itself (no polling); past the bound it is killed, and the test fails.
    let pid = app.pid();
    let log = app.data_dir.with_extension("log");
    let waited = tokio::time::timeout(
        Duration::from_secs(40),
        tokio::task::spawn_blocking(move || app.wait()),
    )
    .await;
    let took = started.elapsed();
    eprintln!("shutdown took {took:?}; log {}", log.display());
    if waited.is_err() {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    assert!(
        waited.is_ok(),
        "SIGTERM did not end the server within {took:?} while MySQL was silent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_after_commit_does_not_fail_committed_orders() {
    // Proves (or refutes): when the connection is lost right after the server took COMMIT, and
    // the writer's "is it committed?" look fails too, the retry does not run into the batch's
    // own rows (duplicate lsn) and answer 500 for orders that are in the journal.
    let database = TestDatabase::create().await;
    let proxy = Proxy::start(1).await;
    let url = proxy.url(&database);
    let app = spawn_app(&["--mysql-url", &url, "--mysql-pool-size", "2"]);
    let mut client = app.client();
    assert_eq!(client.put_product("C", 100, 10).await.status, 200);
    let pool = database.pool().await;
    // Once the product is applied nothing commits until the checkout: its COMMIT is the next.
    wait_projected(&pool).await;
    proxy.cut_after_next_commit();
    let answer = client
        .checkout("cut-1", "C", 1, "tok_ok")
        .await
        .expect("answer");
    let in_journal: i64 =
        sqlx::query("SELECT COUNT(*) FROM journal WHERE idempotency_key = 'cut-1'")
            .fetch_one(&pool)
            .await
            .map(|r| r.get(0))
            .expect("count");
    assert_eq!(
        proxy.cuts.load(Ordering::Acquire),
        1,
        "a connection was cut after COMMIT"
    );
    assert_eq!(
        proxy.refused_left(),
        0,
        "the look after the cut was refused"
    );
    assert_eq!(in_journal, 1, "the order was committed");
    assert_eq!(
        answer.status,
        201,
        "an order that is in the journal was answered: {}",
        String::from_utf8_lossy(&answer.body)
    );
    // Memory agrees with the journal: the unit is held or sold.
    wait_projected(&pool).await;
    let (_, available, _, _) = client.stock("C").await;
    assert_eq!(available, 9, "memory forgot a committed order");
}
