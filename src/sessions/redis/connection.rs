//! The one multiplexed connection and its supervisor: every call bounded by `--redis-timeout`; a
//! call that finds the connection broken drops it and wakes the supervisor, which reconnects with
//! the one backoff while calls fail at once with the last error.

use super::*;

impl RedisStore {
    pub(super) async fn connect(&self) -> Result<(), String> {
        let attempt = self
            .client
            .get_multiplexed_async_connection_with_config(&self.connection_config);
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(error.to_string()),
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
        while !self.stopped.load(Ordering::Acquire) {
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
        invocation: &ScriptInvocation<'_>,
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
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let Some(connection) = self.connection.load_full() else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            let reason = lock(&self.last_error)
                .clone()
                .unwrap_or_else(|| "not connected".into());
            return Err(StoreError::Unavailable(reason));
        };
        let mut handle = MultiplexedConnection::clone(&connection);
        let outcome =
            match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut handle)).await {
                Ok(Ok(value)) => return Ok(value),
                // Redis answered, and what it said is not about being unavailable (a key of
                // another type, bytes that are not UTF-8, a script failing on a value): something
                // else wrote under the prefix. Not "unavailable", or a checkout would go on
                // without the lock past an answer it could not read.
                Ok(Err(error)) if is_unexpected(&error) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(StoreError::Unexpected {
                        key: subject.to_owned(),
                        what: error.to_string(),
                    });
                }
                Ok(Err(error)) => {
                    let broken = error.is_io_error()
                        || error.is_timeout()
                        || error.is_connection_dropped()
                        || error.is_connection_refusal()
                        || error.is_unrecoverable_error();
                    (error.to_string(), broken)
                }
                Err(_) => (format!("no answer within {:?}", self.timeout), true),
            };
        let (reason, broken) = outcome;
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
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
}
