//! The submission locks past a checkout's hold: renewed until the checkout's outcome is known
//! ([`Submission`]), and released with its answer stored (the ends queued and sent in batches
//! after the journal's commit).

use super::connection::{Call, Connection, Failed};
use super::*;

/// A checkout's end: its answer to store (and for how long), and its lock to release.
pub(super) struct Finish {
    pub(super) key: IdempotencyKey,
    pub(super) value: String,
    pub(super) answer: Option<(StoredAnswer, i64)>,
    /// Past this an end that could not be sent is dropped.
    pub(super) deadline: tokio::time::Instant,
    /// When its lock expires at the latest (it is no longer renewed): a stopping node waits for
    /// Redis until then, since past it another node may start the key again.
    pub(super) lock_deadline: tokio::time::Instant,
}

impl Finish {
    /// An end kept until its lock has expired anyway, or, with an answer, as long as the answer
    /// lives: a checkout that went on without the lock (Redis down longer than a minute) must
    /// still leave its answer once Redis is back, or a retry on another node buys again. FINISH
    /// never replaces an answer nor stores one while another checkout holds the lock, so a late
    /// one is safe.
    pub(super) fn new(
        key: IdempotencyKey,
        value: String,
        answer: Option<(StoredAnswer, i64)>,
        lock: Duration,
    ) -> Self {
        let keep = answer.as_ref().map_or(lock, |(_, ttl_ms)| {
            Duration::from_millis(u64::try_from(*ttl_ms).unwrap_or(0)).max(lock)
        });
        let now = tokio::time::Instant::now();
        Self {
            key,
            value,
            answer,
            deadline: now + keep,
            lock_deadline: now + lock,
        }
    }
}

impl Finish {
    /// Its arguments in a `STEPS` call (`e` and its lock value, answer, answer TTL).
    pub(super) fn push_args(&self, invocation: &mut ScriptInvocation<'_>) {
        let (encoded, ttl_ms) = match &self.answer {
            Some((answer, ttl_ms)) => (encode_answer(answer), (*ttl_ms).max(1)),
            None => (String::new(), 0),
        };
        invocation
            .arg(format!("e{}", self.value))
            .arg(encoded)
            .arg(ttl_ms);
    }
}

impl RedisStore {
    /// Renews the registered locks a third of their TTL at a time, and at once after a
    /// reconnection (an outage may have used up most of their life), until [`Self::stop`].
    pub(super) async fn renew_held_locks(&self) {
        let every = Duration::from_millis(self.lock_ttl_ms / 3).max(Duration::from_millis(100));
        loop {
            let reconnected = self.reconnected.notified();
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = reconnected => {}
            }
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            let held: Vec<(u64, Held)> = lock(&self.held)
                .iter()
                .map(|(id, held)| (*id, held.clone()))
                .collect();
            for batch in held.chunks(RENEWALS_PER_CALL_MAX) {
                if let Err(error) = self.renew_batch(batch).await {
                    tracing::warn!(%error, locks = batch.len(), "could not renew submission locks in Redis; retrying at the next renewal");
                    break;
                }
            }
        }
    }

    /// The parts of a batch one script call each takes: the whole batch with one server; on a
    /// Redis Cluster (a script touches one slot, and each key of a batch has its own) each item
    /// alone, the calls running concurrently over the one multiplexed connection. With the index
    /// of each part's first item.
    pub(super) fn slot_parts<'a, T>(&self, batch: &'a [T]) -> Vec<(usize, &'a [T])> {
        match self.client.is_cluster() {
            true => batch.chunks(1).enumerate().collect(),
            false => vec![(0, batch)],
        }
    }

    /// Runs one batched script per part ([`Self::slot_parts`]) at once: the indexes (from 1)
    /// they return, in the batch's numbering. A part that failed fails the whole (which is sent
    /// again: every batched script may run twice on the same items).
    pub(super) async fn run_parts(
        &self,
        subject: &str,
        parts: &[(usize, usize, ScriptInvocation<'_>)],
    ) -> Result<Vec<usize>, StoreError> {
        let (answers, _) = self.send_parts::<Vec<usize>, _>(subject, parts, None).await;
        let mut indexes = Vec::new();
        for (at, _, answer) in answers {
            indexes.extend(answer?.into_iter().map(|i| i + at));
        }
        Ok(indexes)
    }

    /// Sends every part (its first item's index, its length, its script) at once, on `own` (a
    /// core's own connection, [`super::starts`]) if given, else on the shared one: each part's
    /// answer, and whether `own` broke (a part it failed is sent again on the shared one).
    pub(super) async fn send_parts<R: redis::FromRedisValue, C: Call>(
        &self,
        subject: &str,
        parts: &[(usize, usize, C)],
        own: Option<&Connection>,
    ) -> (Vec<(usize, usize, Result<R, StoreError>)>, bool) {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let mut running: FuturesUnordered<_> = parts
            .iter()
            .map(|(at, count, invocation)| async move {
                let (answer, broke) = self.send_part(own, subject, invocation).await;
                ((*at, *count, answer), broke)
            })
            .collect();
        let (mut answers, mut broke) = (Vec::with_capacity(parts.len()), false);
        while let Some((answer, broken)) = running.next().await {
            answers.push(answer);
            broke |= broken;
        }
        (answers, broke)
    }

    /// One part: on `own` if given (a failure sent again on the shared connection; `true` if
    /// `own` is broken), else on the shared one.
    async fn send_part<R: redis::FromRedisValue>(
        &self,
        own: Option<&Connection>,
        subject: &str,
        invocation: &impl Call,
    ) -> (Result<R, StoreError>, bool) {
        let Some(connection) = own else {
            return (self.run(subject, invocation).await, false);
        };
        match self.call_on(connection, subject, invocation).await {
            Ok(answer) => (Ok(answer), false),
            Err(Failed::Answered(error)) => (Err(error), false),
            Err(Failed::Lost(reason, broken)) => {
                tracing::debug!(%reason, "a core's own Redis connection failed a batch; it runs again on the shared one");
                (self.run(subject, invocation).await, broken)
            }
        }
    }

    pub(super) async fn renew_batch(&self, batch: &[(u64, Held)]) -> Result<(), StoreError> {
        // Sent now: a lock renewed lives at least its TTL from here.
        let sent = monotonic_ms();
        let parts: Vec<_> = self
            .slot_parts(batch)
            .into_iter()
            .map(|(at, part)| {
                let mut invocation = self.scripts.renew.prepare_invoke();
                invocation.arg(self.lock_ttl_ms);
                for (_, held) in part {
                    invocation
                        .key(self.key("key", held.key.as_str()))
                        .arg(&held.value);
                }
                (at, part.len(), invocation)
            })
            .collect();
        let lost = self
            .run_parts("a batch of submission locks", &parts)
            .await?;
        self.stats
            .renewals
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let lost: std::collections::HashSet<usize> = lost.into_iter().collect();
        for (i, (_, held)) in batch.iter().enumerate() {
            if !lost.contains(&(i + 1)) {
                held.confirmed.fetch_max(sent, Ordering::AcqRel);
            }
        }
        for index in lost {
            let Some((id, Held { key, .. })) = index.checked_sub(1).and_then(|i| batch.get(i))
            else {
                continue;
            };
            // A checkout that ended meanwhile released its own lock: not lost.
            if lock(&self.held).remove(id).is_some() {
                self.stats.locks_lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!(key = %key.as_str(), lock = %self.key("key", key.as_str()), "a submission lock expired or was taken while this node's checkout under it has no known outcome: another node may start the same key (was Redis restarted without persistence, or unreachable for longer than --redis-lock-ttl?)");
            }
        }
        Ok(())
    }

    /// A submission lock for a checkout under `key`, not taken yet: [`Self::begin`] takes it. Kept
    /// by a checkout that goes on without Redis too, since a lock call that timed out may still
    /// have taken it, and its answer must reach Redis (with the lock released) once Redis is back.
    pub fn submission(self: &Arc<Self>, key: &IdempotencyKey) -> Submission {
        let id = self.locks_taken.fetch_add(1, Ordering::Relaxed);
        Submission {
            store: Arc::clone(self),
            key: key.clone(),
            value: format!("~{}/{}/{id}/", self.node, self.run_id),
            id,
            open: true,
            renewed: false,
            // Before the lock is asked for: it lives at least its TTL from here.
            confirmed: Arc::new(AtomicU64::new(monotonic_ms())),
        }
    }

    /// Sends the checkouts' ends as they come, up to [`FINISHES_PER_CALL_MAX`] in one call; a
    /// batch Redis did not take is sent again (with backoff) until its locks expire. Once the
    /// node is stopping, what is queued is still sent again until its locks expire: a node that
    /// left with answers Redis never got would let another node sell those keys again once the
    /// locks are gone (the supervisor keeps reconnecting until this task ends).
    pub(super) async fn send_finishes(&self, mut receiver: tokio::sync::mpsc::Receiver<Finish>) {
        self.send_finishes_until_stopped(&mut receiver).await;
        self.finisher_done.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    async fn send_finishes_until_stopped(
        &self,
        receiver: &mut tokio::sync::mpsc::Receiver<Finish>,
    ) {
        let mut batch: Vec<Finish> = Vec::with_capacity(FINISHES_PER_CALL_MAX);
        let mut backoff = Backoff::new(Duration::from_millis(50), RECONNECT_BACKOFF_MAX);
        loop {
            if batch.is_empty() {
                let stopping = self.stopped.load(Ordering::Acquire);
                let next = if stopping {
                    receiver.try_recv().ok()
                } else {
                    tokio::select! {
                        finish = receiver.recv() => finish,
                        () = self.finisher_stop.notified() => {
                            // The cores' queues hand their last ends over first.
                            self.starts.ended().await;
                            receiver.try_recv().ok()
                        }
                    }
                };
                match next {
                    Some(finish) => batch.push(finish),
                    None => return,
                }
            }
            while batch.len() < FINISHES_PER_CALL_MAX {
                match receiver.try_recv() {
                    Ok(finish) => batch.push(finish),
                    Err(_) => break,
                }
            }
            match self.finish_batch(&batch).await {
                Ok(()) => {
                    batch.clear();
                    backoff.reset();
                    self.ends_waiting.store(0, Ordering::Relaxed);
                }
                Err(error) => {
                    let now = tokio::time::Instant::now();
                    let before = batch.len();
                    let stopping = self.stopped.load(Ordering::Acquire);
                    batch.retain(|finish| {
                        finish.deadline > now && (!stopping || finish.lock_deadline > now)
                    });
                    if batch.len() < before {
                        let dropped = before - batch.len();
                        match stopping {
                            false => {
                                tracing::warn!(%error, dropped, "could not store answers and release submission locks in Redis before the locks expired")
                            }
                            true => {
                                tracing::error!(%error, dropped, "stopping: Redis did not take these checkouts' answers before their submission locks expired; another node may place their keys again (restart this node on its data dir to send them)")
                            }
                        }
                    }
                    self.ends_waiting.store(batch.len(), Ordering::Relaxed);
                    // Sent again as soon as the connection is back, or after the backoff.
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_wait()) => {}
                        () = self.reconnected.notified() => {}
                    }
                }
            }
        }
    }

    pub(super) async fn finish_batch(&self, batch: &[Finish]) -> Result<(), StoreError> {
        let parts = self.steps_parts(batch);
        let (answers, _) = self
            .send_parts::<Vec<String>, _>("a batch of answers and locks", &parts, None)
            .await;
        for (finish, reply) in batch.iter().zip(Self::step_replies(batch.len(), answers)) {
            if reply?.0 == "twin" {
                self.report_twin(&finish.key);
            }
        }
        Ok(())
    }

    /// A key another node answered, or is running, while this node's answer could not reach Redis.
    pub(super) fn report_twin(&self, key: &IdempotencyKey) {
        self.stats.locks_lost.fetch_add(1, Ordering::Relaxed);
        tracing::error!(key = %key.as_str(), "another node answered this key, or is running it, while this node's answer could not reach Redis (cut off from it for longer than --redis-lock-ttl, Redis restarted without its data, or something else wrote the key): the key has, or is about to have, an order on each of two nodes; look at both and cancel one");
    }

    /// Sends again, in the background, the answers this node gave since `answers`' oldest (read
    /// back from its journal at start) with the locks its earlier runs left: a node killed after
    /// answering and before its finisher reached Redis would otherwise leave other nodes `409` for
    /// a minute, then free to take the keys again. An answer already in Redis is left as it is.
    pub fn recover(self: &Arc<Self>, answers: Vec<(IdempotencyKey, StoredAnswer, i64)>) {
        if answers.is_empty() {
            return;
        }
        // Through the finisher's queue (waiting for room), so its batching and retries serve
        // these too.
        let (finishes, prefix) = (self.finishes.clone(), format!("~{}/", self.node));
        let lock_ttl = self.lock_ttl();
        tokio::spawn(async move {
            let count = answers.len();
            for (key, answer, ttl_ms) in answers {
                let end = Finish::new(key, prefix.clone(), Some((answer, ttl_ms)), lock_ttl);
                if finishes.send(end).await.is_err() {
                    return;
                }
            }
            tracing::info!(answers = count, "queued this node's recent answers for Redis again, with the release of the locks its earlier run left on them");
        });
    }

    /// Queues an end for the finisher (or, with its queue full, sends it alone).
    pub(super) fn finish_later(self: &Arc<Self>, finish: Finish) {
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(finish)) =
            self.finishes.try_send(finish)
        {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let store = Arc::clone(self);
            runtime.spawn(async move {
                if let Err(error) = store.finish_batch(std::slice::from_ref(&finish)).await {
                    tracing::warn!(%error, key = %finish.key.as_str(), "could not release a submission lock in Redis; it expires by itself");
                }
            });
        }
    }
}

/// A submission lock this checkout holds. [`Submission::finish`] stores the answer and releases
/// it; dropped unfinished, it is released (the checkout ended without an answer to keep);
/// [`Submission::keep`] leaves a lock this checkout did not take to whoever holds it;
/// [`Submission::hold_until_restart`] keeps it renewed for the life of the process (the outcome
/// is unknown: another node must not start the same checkout while this one's commit may still
/// land).
pub struct Submission {
    pub(super) store: Arc<RedisStore>,
    pub(super) key: IdempotencyKey,
    pub(super) value: String,
    /// This submission's number in the store (its place in the renewed locks).
    pub(super) id: u64,
    pub(super) open: bool,
    /// Registered with the store's renewer ([`Self::keep_alive`]).
    pub(super) renewed: bool,
    /// When the lock was last known to live on for its TTL ([`monotonic_ms`]): asked for, or
    /// renewed.
    pub(super) confirmed: Arc<AtomicU64>,
}

/// A lock the renewer keeps alive: its key, its value, and when it was last renewed.
#[derive(Clone)]
pub(super) struct Held {
    key: IdempotencyKey,
    value: String,
    confirmed: Arc<AtomicU64>,
}

/// Milliseconds of a monotonic clock that runs on while the process is paused (`SIGSTOP`):
/// what a lock's age is measured in.
fn monotonic_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(
        BASE.get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// How long ago a checkout's lock was last known to be its own, read when its record is about
/// to go ([`Submission::lock_clock`]).
#[derive(Clone)]
pub struct LockClock {
    confirmed: Arc<AtomicU64>,
    ttl_ms: u64,
}

impl LockClock {
    /// `Err` (why) when the lock was last confirmed more than two thirds of `--redis-lock-ttl`
    /// ago: it may have expired meanwhile (the process paused, Redis unreachable) and another
    /// node taken the key. Renewed every third of the TTL, a live lock is never that old.
    pub fn check(&self) -> Result<(), String> {
        let age = monotonic_ms().saturating_sub(self.confirmed.load(Ordering::Acquire));
        if age.saturating_mul(3) > self.ttl_ms.saturating_mul(2) {
            Err(format!(
                "this checkout's Redis submission lock was last renewed {age} ms ago (--redis-lock-ttl {} ms): it may have expired and another node may be placing the key, so nothing was recorded",
                self.ttl_ms
            ))
        } else {
            Ok(())
        }
    }
}

impl Submission {
    /// Keeps the lock alive until this submission ends: renewed a third of `--redis-lock-ttl` at
    /// a time while the checkout authorises and commits, however long its commit takes to be
    /// known.
    pub fn keep_alive(&mut self) {
        if !self.renewed {
            self.renewed = true;
            lock(&self.store.held).insert(
                self.id,
                Held {
                    key: self.key.clone(),
                    value: self.value.clone(),
                    confirmed: Arc::clone(&self.confirmed),
                },
            );
        }
    }

    /// How long ago this checkout's lock was last known to be its own ([`LockClock::check`]).
    pub fn lock_clock(&self) -> LockClock {
        LockClock {
            confirmed: Arc::clone(&self.confirmed),
            ttl_ms: self.store.lock_ttl_ms,
        }
    }

    /// Stores `answer` for `ttl_ms` and releases the lock, in the background: the client's answer
    /// does not wait for it. Retried while Redis is unreachable, for as long as the answer lives.
    pub fn finish(mut self, answer: StoredAnswer, ttl_ms: i64) {
        self.open = false;
        self.stop_renewing();
        self.send_end(Some((answer, ttl_ms)));
    }

    /// Leaves the lock as it is: for a checkout that did not take it (another holds it, or an
    /// answer was found).
    pub fn keep(mut self) {
        self.open = false;
        self.stop_renewing();
    }

    /// The checkout's outcome stays unknown until a restart's recovery: its lock, if
    /// [`Self::keep_alive`] registered it, is renewed for as long as this process lives, then
    /// expires (a restarted node learns the outcome from its journal and sends the answer again,
    /// `RedisStore::recover`).
    pub fn hold_until_restart(mut self) {
        self.open = false;
    }

    fn stop_renewing(&mut self) {
        if self.renewed {
            self.renewed = false;
            lock(&self.store.held).remove(&self.id);
        }
    }

    fn send_end(&self, answer: Option<(StoredAnswer, i64)>) {
        self.store.enqueue_finish(Finish::new(
            self.key.clone(),
            self.value.clone(),
            answer,
            self.store.lock_ttl(),
        ));
    }
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("key", &self.key.as_str())
            .field("value", &self.value)
            .finish()
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if self.open {
            self.stop_renewing();
            self.send_end(None);
        }
    }
}
