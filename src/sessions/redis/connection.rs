//! The one multiplexed connection and its supervisor: every call bounded by `--redis-timeout`; a
//! call that finds the connection broken drops it and wakes the supervisor, which reconnects with
//! the one backoff while calls fail at once with the last error.
//!
//! The connection is to one server, or to a Redis Cluster (`--redis-url` lists its nodes,
//! comma-separated): redis-rs's cluster client then routes each call to the master of its key's
//! slot, follows `MOVED`/`ASK` and keeps a connection per master. One server found to be a
//! cluster's node is refused with a message saying so (its answers would be `MOVED` redirects).

use super::*;
use redis::aio::ConnectionLike;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

/// Where Redis is.
pub(super) enum Client {
    /// One server.
    One(redis::Client, AsyncConnectionConfig),
    /// The nodes of a Redis Cluster.
    Cluster(ClusterClient),
}

impl Client {
    /// The client for `--redis-url`: one URL, or a cluster's nodes separated by commas.
    pub(super) fn open(url: &str, timeout: Duration) -> Result<Self, String> {
        let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
        if nodes.len() == 1 {
            let client = redis::Client::open(url).map_err(|e| e.to_string())?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(timeout)
                .set_response_timeout(timeout);
            return Ok(Self::One(client, config));
        }
        if nodes.iter().any(|node| !node.starts_with("redis://")) {
            return Err("the nodes of a Redis Cluster are redis://host:port URLs".into());
        }
        ClusterClient::builder(nodes)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            // Redirections and a master's failover are followed within the call's own timeout.
            .retries(3)
            .build()
            .map(Self::Cluster)
            .map_err(|e| e.to_string())
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    pub(super) async fn connect(&self) -> Result<Connection, String> {
        match self {
            Self::One(client, config) => {
                let mut connection = client
                    .get_multiplexed_async_connection_with_config(config)
                    .await
                    .map_err(|e| e.to_string())?;
                let server: String = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut connection)
                    .await
                    .map_err(|e| e.to_string())?;
                check_version(&server)?;
                let info: String = redis::cmd("INFO")
                    .arg("cluster")
                    .query_async(&mut connection)
                    .await
                    .map_err(|e| e.to_string())?;
                if info.contains("cluster_enabled:1") {
                    return Err("this Redis is a node of a Redis Cluster: give --redis-url as the cluster's nodes, comma-separated (redis://a:6379,redis://b:6379)".into());
                }
                Ok(Connection::One(connection))
            }
            Self::Cluster(client) => client
                .get_async_connection()
                .await
                .map(Connection::Cluster)
                .map_err(|e| e.to_string()),
        }
    }
}

/// Turnstile needs Redis 7.0 or later (a checkout's start is `SET ... NX GET`): the version `INFO
/// server` gives, else why not.
fn check_version(info: &str) -> Result<(), String> {
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(str::trim);
    let major = version.and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    match (version, major) {
        (Some(version), Some(major)) if major < 7 => Err(format!(
            "Redis {version} is too old: Turnstile needs Redis 7.0 or later (SET with NX and GET together)"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redis_before_7_is_refused_with_its_version() {
        let refused = super::check_version("# Server\r\nredis_version:6.2.14\r\n").unwrap_err();
        assert!(
            refused.contains("6.2.14") && refused.contains("7.0"),
            "{refused}"
        );
        assert!(super::check_version("redis_version:7.0.15\r\n").is_ok());
        // A server that says no version (a proxy, a fork) is tried.
        assert!(super::check_version("# Server\r\n").is_ok());
    }
}

/// What goes to Redis in one call: a script, or a pipeline of plain commands (one round trip,
/// every command's reply given back as it came, errors included, so a value of another type
/// under one key fails only its own step: [`super::starts`]).
pub(super) trait Call: Sync {
    fn call<'a>(&'a self, connection: &'a mut Connection) -> redis::RedisFuture<'a, redis::Value>;
}

impl Call for ScriptInvocation<'_> {
    fn call<'a>(&'a self, connection: &'a mut Connection) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(self.invoke_async(connection))
    }
}

impl Call for redis::Pipeline {
    fn call<'a>(&'a self, connection: &'a mut Connection) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let replies = connection.req_packed_commands(self, 0, self.len()).await?;
            Ok(redis::Value::Array(replies))
        })
    }
}

/// A connection to one server or to a cluster; cloning it is cheap (both are multiplexed).
#[derive(Clone)]
pub(super) enum Connection {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::One(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::One(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::One(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

impl RedisStore {
    pub(super) async fn connect(&self) -> Result<(), String> {
        let attempt = self.client.connect();
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("no connection within {:?}", self.timeout)),
        };
        match result {
            Ok(connection) => {
                self.connection.store(Some(Arc::new(connection)));
                self.reconnected.notify_waiters();
                *lock(&self.last_error) = None;
                tracing::info!(node = %self.node, prefix = %self.prefix, "Redis connected");
                Ok(())
            }
            Err(error) => {
                *lock(&self.last_error) = Some(error.clone());
                Err(error)
            }
        }
    }

    pub(super) async fn supervise(&self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), RECONNECT_BACKOFF_MAX);
        // Until the finisher has ended: a stopping node still sends its last answers.
        while !self.finisher_done.load(Ordering::Acquire) {
            if self.connection.load().is_some() {
                backoff.reset();
                self.wake.notified().await;
                continue;
            }
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            match self.connect().await {
                Ok(()) => tracing::info!("Redis is back"),
                Err(error) => {
                    let wait = backoff.next_wait();
                    tracing::debug!(%error, ?wait, "Redis reconnection failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Runs a script; a broken connection is dropped and the supervisor woken. A connection found
    /// broken at once (Redis restarted or went away while this node was idle: nothing notices
    /// until a call) is not the answer: the call waits for the supervisor's new connection, within
    /// `--redis-timeout`, and runs once more. Every script may run twice (`BEGIN` takes a lock it
    /// already holds again). A call that timed out is not retried.
    pub(super) async fn run<T: redis::FromRedisValue>(
        &self,
        subject: &str,
        invocation: &impl Call,
    ) -> Result<T, StoreError> {
        let started = tokio::time::Instant::now();
        let had_connection = self.connection.load().is_some();
        let error = match self.run_once(subject, invocation).await {
            Err(error @ StoreError::Unavailable(_)) => error,
            other => return other,
        };
        let deadline = started + self.timeout;
        // Registered before the check, so a reconnection between the two is not missed.
        let reconnected = self.reconnected.notified();
        tokio::pin!(reconnected);
        reconnected.as_mut().enable();
        // Only a call whose failure dropped the connection waits for the next one (an error that
        // left it in place, like a full Redis, is the answer).
        if !had_connection || self.connection.load().is_some() {
            return Err(error);
        }
        if tokio::time::timeout_at(deadline, reconnected)
            .await
            .is_err()
        {
            return Err(error);
        }
        tokio::time::timeout_at(deadline, self.run_once(subject, invocation))
            .await
            .unwrap_or(Err(error))
    }

    pub(super) async fn run_once<T: redis::FromRedisValue>(
        &self,
        subject: &str,
        invocation: &impl Call,
    ) -> Result<T, StoreError> {
        let Some(connection) = self.connection.load_full() else {
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            let reason = lock(&self.last_error)
                .clone()
                .unwrap_or_else(|| "not connected".into());
            return Err(StoreError::Unavailable(reason));
        };
        let (reason, broken) = match self.call_on(&connection, subject, invocation).await {
            Ok(value) => return Ok(value),
            Err(Failed::Answered(error)) => return Err(error),
            Err(Failed::Lost(reason, broken)) => (reason, broken),
        };
        *lock(&self.last_error) = Some(reason.clone());
        if broken {
            // Only the connection that failed is dropped: a newer one may already be in place.
            let current = self.connection.load();
            if current
                .as_ref()
                .is_some_and(|now| Arc::ptr_eq(now, &connection))
            {
                self.connection.store(None);
                tracing::warn!(error = %reason, "Redis connection lost; reconnecting");
            }
            self.wake.notify_one();
        }
        Err(StoreError::Unavailable(reason))
    }

    /// One call on `connection` (the shared one, or a core's own: [`super::starts`]), counted.
    pub(super) async fn call_on<T: redis::FromRedisValue>(
        &self,
        connection: &Connection,
        subject: &str,
        invocation: &impl Call,
    ) -> Result<T, Failed> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let mut handle = Connection::clone(connection);
        let answer = tokio::time::timeout(self.timeout, invocation.call(&mut handle))
            .await
            .map(|called| called.and_then(redis::from_owned_redis_value));
        let failed = match answer {
            Ok(Ok(value)) => return Ok(value),
            // Redis answered, and what it said is not about being unavailable (a key of
            // another type, bytes that are not UTF-8, a script failing on a value): something
            // else wrote under the prefix. Not "unavailable", or a checkout would go on
            // without the lock past an answer it could not read.
            Ok(Err(error)) if is_unexpected(&error) => Failed::Answered(StoreError::Unexpected {
                key: subject.to_owned(),
                what: error.to_string(),
            }),
            Ok(Err(error)) => {
                let broken = error.is_io_error()
                    || error.is_timeout()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_unrecoverable_error();
                Failed::Lost(error.to_string(), broken)
            }
            Err(_) => Failed::Lost(format!("no answer within {:?}", self.timeout), true),
        };
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        Err(failed)
    }
}

/// How a call failed.
pub(super) enum Failed {
    /// Redis answered something Turnstile did not write: the call's answer.
    Answered(StoreError),
    /// No usable answer (why), and whether the connection is broken.
    Lost(String, bool),
}
