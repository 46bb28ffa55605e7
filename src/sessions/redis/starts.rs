//! Checkouts' starts and ends, batched per core: the look of a sold-out refusal (`peek`), the
//! start of a checkout naming its items (`begin`: the answer, else the lock) and a checkout's end
//! (its answer replacing its lock: queued after the journal's commit, not awaited) go
//! through the queue of the calling thread's core slot (`sync::PerCore`). Each core's queue has a
//! task of its own, started on that core's runtime at its first start, with a Redis connection of
//! its own made there: a per-core worker's starts and ends, their batching, the connection's
//! socket and the wake-ups all stay on its thread. The task sends everything queued as one
//! pipeline of plain commands (up to [`STEPS_PER_CALL_MAX`] steps; one write, one round trip),
//! then the next batch once that is answered: an idle node sends a step at once, a busy one many
//! per round trip — so a checkout's end rides with later checkouts' starts.
//!
//! **What a checkout costs Redis: two plain commands and a `PTTL`, no script.** A start is
//! `SET key <lock> NX PX <ttl> GET`: one command takes the lock and says what was there (an
//! answer to replay, another checkout's lock, its own lock from a start sent twice), with `PTTL`
//! behind it to tell a lock without expiry (junk) from a live one. An end is `SET key <answer> PX
//! <ttl> GET`: the answer replaces the lock, and what it replaced says whether the lock was still
//! its own (or gone: `done`) or another's (a twin, reported: see [`read_plain`]). The script this
//! replaced (`STEPS` for every step) spent about two thirds of its time in the Lua around the
//! same commands; an end checks ownership after the fact instead of before, which matters only
//! for a twin, and only an end sent right after its commit takes this path (its lock confirmed
//! within two thirds of its TTL just before: `Submission::lock_clock`). Late ends (after an
//! outage, a restart's recovery) and lock releases without an answer go through the finisher's
//! `STEPS` script, which replaces nothing it does not own. On a Redis Cluster the batch goes one
//! pipeline per key, concurrently ([`RedisStore::slot_parts`]). A checkout naming a cart starts
//! alone (its cart read in the same script, `BEGIN`). Needs Redis 7.0 (`NX` with `GET`).
//!
//! A core's own connection is made only while the shared one is up (the supervisor's: the
//! node's view of whether Redis answers); a batch it fails to carry is sent again on the shared
//! connection, with its reconnection wait ([`RedisStore::run`]), and a broken one is dropped (the
//! next batch makes a new one; one that cannot be made is tried again after
//! [`OWN_CONNECTION_RETRY`], the shared connection carrying the core's steps meanwhile). Every
//! step may run twice (a start finds its own lock, an end its own answer). Ends a batch could not carry go to the finisher, which sends them again with backoff
//! until their locks expire; so do the ends of a core whose queue is full, or not started, and
//! those left queued when the node stops (the finisher waits for every core's task to hand them
//! over before its last batch).
//!
//! A start whose caller has gone (the request was dropped) while its batch ran, and which took
//! the lock, has that lock released: the caller's own release may have reached Redis before the
//! batch did.

use super::connection::Connection;
use super::*;
use crate::sync::PerCore;
use std::sync::OnceLock;
use tokio::sync::oneshot;

/// Steps queued at most per core; past it a start is sent alone, an end goes to the finisher.
const STEPS_QUEUED_MAX: usize = 65_536;

/// Steps sent in one call at most.
const STEPS_PER_CALL_MAX: usize = 256;

/// How long a core whose own connection could not be made sends on the shared one before it
/// tries again.
const OWN_CONNECTION_RETRY: Duration = Duration::from_secs(2);

/// One queued start.
pub(super) struct Start {
    key: IdempotencyKey,
    /// The lock value to take; `None`: a look only, which takes nothing.
    value: Option<String>,
    reply: oneshot::Sender<Result<Begin, StoreError>>,
}

/// What a core's queue carries: a checkout's start, or its end.
pub(super) enum Step {
    Start(Start),
    End(Finish),
}

/// One core's queue of steps: its sending task is started at the core's first start.
#[derive(Default)]
struct Lane {
    queue: OnceLock<tokio::sync::mpsc::Sender<Step>>,
    stop: tokio::sync::Notify,
}

/// The per-core queues of steps.
pub(super) struct Starts {
    lanes: PerCore<Lane>,
    /// The cores' sending tasks still running: the finisher's last batch waits for them.
    running: AtomicU64,
    /// Wakes the finisher when a core's task has ended.
    ended: tokio::sync::Notify,
}

impl Starts {
    pub(super) fn new() -> Self {
        Self {
            lanes: PerCore::default(),
            running: AtomicU64::new(0),
            ended: tokio::sync::Notify::new(),
        }
    }

    /// Ends the sending tasks: each sends what it has queued once more, and hands the ends that
    /// batch could not carry to the finisher.
    pub(super) fn stop(&self) {
        for lane in self.lanes.iter() {
            lane.stop.notify_one();
        }
    }

    /// Once every core's sending task has ended.
    pub(super) async fn ended(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.running.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl RedisStore {
    /// A start through the calling core's queue: `value` the lock to take, `None` a look only.
    pub(super) async fn queue_start(
        self: &Arc<Self>,
        key: &IdempotencyKey,
        value: Option<String>,
    ) -> Result<Begin, StoreError> {
        let stopping = || StoreError::Unavailable("the node is stopping".into());
        if self.stopped.load(Ordering::Acquire) {
            return Err(stopping());
        }
        let lane_index = self.starts.lanes.local_index();
        let lane = self.starts.lanes.local();
        let queue = lane.queue.get_or_init(|| {
            let (queue, receiver) = tokio::sync::mpsc::channel(STEPS_QUEUED_MAX);
            let store = Arc::clone(self);
            self.starts.running.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(async move {
                store.send_steps(lane_index, receiver).await;
                store.starts.running.fetch_sub(1, Ordering::AcqRel);
                store.starts.ended.notify_waiters();
            });
            queue
        });
        let (reply, answer) = oneshot::channel();
        let start = Step::Start(Start {
            key: key.clone(),
            value,
            reply,
        });
        match queue.try_send(start) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(start)) => {
                // Sent alone, its own call bounded by --redis-timeout.
                self.send_batch(vec![start], &mut None).await;
                return answer.await.unwrap_or_else(|_| Err(stopping()));
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return Err(stopping()),
        }
        // A queued start waits for the batch ahead of it as well as for its own: bounded as a
        // whole by --redis-timeout (a start given up on that took the lock has it released).
        tokio::time::timeout(self.timeout, answer)
            .await
            .map(|answered| answered.unwrap_or_else(|_| Err(stopping())))
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "Redis did not answer within --redis-timeout ({})",
                    humantime::format_duration(self.timeout)
                )))
            })
    }

    /// Queues a checkout's end on the calling core's queue, where it rides with the next batch
    /// of starts; if that queue is not started, full or stopped, for the finisher.
    pub(super) fn enqueue_finish(self: &Arc<Self>, end: Finish) {
        let Some(queue) = self.starts.lanes.local().queue.get() else {
            return self.finish_later(end);
        };
        if let Err(error) = queue.try_send(Step::End(end)) {
            if let Step::End(end) = error.into_inner() {
                self.finish_later(end);
            }
        }
    }

    async fn send_steps(
        self: &Arc<Self>,
        lane_index: usize,
        mut receiver: tokio::sync::mpsc::Receiver<Step>,
    ) {
        let Some(lane) = self.starts.lanes.iter().nth(lane_index) else {
            return;
        };
        let mut own: Option<Connection> = None;
        // A failed attempt at its own connection is not made again for a while: meanwhile the
        // shared connection carries this core's steps, and no batch waits on a slow connect.
        let mut next_try = tokio::time::Instant::now();
        let mut batch = Vec::with_capacity(STEPS_PER_CALL_MAX);
        loop {
            let stopping = tokio::select! {
                taken = receiver.recv_many(&mut batch, STEPS_PER_CALL_MAX) => {
                    if taken == 0 {
                        return;
                    }
                    false
                }
                () = lane.stop.notified() => true,
            };
            if stopping {
                // What is queued goes once more (its starts fail: the node is stopping), and
                // whatever comes after goes to the finisher.
                receiver.close();
                while let Ok(step) = receiver.try_recv() {
                    batch.push(step);
                }
                let ends: Vec<Step> = batch
                    .drain(..)
                    .filter_map(|step| match step {
                        Step::End(end) => Some(Step::End(end)),
                        Step::Start(_) => None,
                    })
                    .collect();
                let mut ends = ends;
                while !ends.is_empty() {
                    let rest = ends.split_off(ends.len().min(STEPS_PER_CALL_MAX));
                    self.send_batch(ends, &mut own).await;
                    ends = rest;
                }
                return;
            }
            // The core's other ready tasks (requests just read, checkouts just committed) queue
            // their steps first: one pass of the scheduler, no timer, and under load a batch
            // several times larger for the same round trip.
            if batch.len() < STEPS_PER_CALL_MAX {
                tokio::task::yield_now().await;
                while batch.len() < STEPS_PER_CALL_MAX {
                    match receiver.try_recv() {
                        Ok(step) => batch.push(step),
                        Err(_) => break,
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if own.is_none() && now >= next_try && self.connection.load().is_some() {
                own = match tokio::time::timeout(self.timeout, self.client.connect()).await {
                    Ok(Ok(connection)) => Some(connection),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "a core's own Redis connection failed; its steps go on the shared one");
                        None
                    }
                    Err(_) => None,
                };
                if own.is_none() {
                    next_try = now + OWN_CONNECTION_RETRY;
                }
            }
            self.send_batch(std::mem::take(&mut batch), &mut own).await;
        }
    }

    /// The `STEPS` calls of the finisher's `batch` of ends: one per part
    /// ([`Self::slot_parts`]), with the index of its first end and its length.
    pub(super) fn steps_parts(
        &self,
        batch: &[Finish],
    ) -> Vec<(usize, usize, ScriptInvocation<'_>)> {
        self.slot_parts(batch)
            .into_iter()
            .map(|(at, part)| {
                let mut invocation = self.scripts.steps.prepare_invoke();
                invocation.arg(self.lock_ttl_ms);
                for end in part {
                    invocation.key(self.key("key", end.key.as_str()));
                    end.push_args(&mut invocation);
                }
                (at, part.len(), invocation)
            })
            .collect()
    }

    /// The tag and payload `STEPS` gave each of a batch's `count` steps, from each part's answer
    /// (a failed part, or one whose answer is not what `STEPS` writes, fails each of its steps).
    pub(super) fn step_replies(
        count: usize,
        answers: Vec<(usize, usize, Result<Vec<String>, StoreError>)>,
    ) -> Vec<Result<(&'static str, String), StoreError>> {
        let mut replies: Vec<Result<(&'static str, String), StoreError>> =
            std::iter::repeat_with(|| Err(StoreError::Unavailable("no answer for a step".into())))
                .take(count)
                .collect();
        for (at, length, answer) in answers {
            let read = answer.and_then(|fields| read_steps(length, fields));
            for (i, slot) in replies.iter_mut().enumerate().skip(at).take(length) {
                *slot = match &read {
                    Ok(steps) => Ok(steps[i - at].clone()),
                    Err(error) => Err(error.clone()),
                };
            }
        }
        replies
    }

    /// The plain commands of a core's batch, one pipeline per part ([`Self::slot_parts`]): a
    /// start `SET key <lock> NX PX <ttl> GET` then `PTTL key` (a look: `GET key`, `PTTL key`); an
    /// end `SET key <answer> PX <ttl> GET`. Each part gives back its first step's index, its
    /// length and its pipeline.
    fn plain_parts(&self, batch: &[Step]) -> Vec<(usize, usize, redis::Pipeline)> {
        self.slot_parts(batch)
            .into_iter()
            .map(|(at, part)| {
                let mut pipe = redis::pipe();
                for step in part {
                    match step {
                        Step::Start(start) => {
                            let key = self.key("key", start.key.as_str());
                            match &start.value {
                                Some(value) => pipe
                                    .cmd("SET")
                                    .arg(&key)
                                    .arg(value)
                                    .arg("NX")
                                    .arg("PX")
                                    .arg(self.lock_ttl_ms)
                                    .arg("GET"),
                                None => pipe.cmd("GET").arg(&key),
                            };
                            pipe.cmd("PTTL").arg(key);
                        }
                        Step::End(end) => match &end.answer {
                            Some((answer, ttl_ms)) => {
                                pipe.cmd("SET")
                                    .arg(self.key("key", end.key.as_str()))
                                    .arg(encode_answer(answer))
                                    .arg("PX")
                                    .arg((*ttl_ms).max(1))
                                    .arg("GET");
                            }
                            // A release is the finisher's (compare-and-delete, [`Self::send_batch`]
                            // sends it there): never a plain write here, only a read that keeps
                            // the replies in step ([`read_plain`] hands it to the finisher).
                            None => {
                                pipe.cmd("PTTL").arg(self.key("key", end.key.as_str()));
                            }
                        },
                    }
                }
                (at, part.len(), pipe)
            })
            .collect()
    }

    /// One pipeline per part of `batch` (one with one server), on `own` (a core's own
    /// connection) if given, else (or once `own` failed) on the shared one. Every start is
    /// answered; an end whose part failed goes to the finisher, which sends it again. An end
    /// without an answer (a refusal, a failure: its lock released only if still its own) goes to
    /// the finisher's script at once.
    pub(super) async fn send_batch(
        self: &Arc<Self>,
        batch: Vec<Step>,
        own: &mut Option<Connection>,
    ) {
        let (batch, releases): (Vec<Step>, Vec<Step>) = batch
            .into_iter()
            .partition(|step| !matches!(step, Step::End(end) if end.answer.is_none()));
        for release in releases {
            if let Step::End(end) = release {
                self.finish_later(end);
            }
        }
        if batch.is_empty() {
            return;
        }
        let parts = self.plain_parts(&batch);
        let subject = match batch.as_slice() {
            [Step::Start(one)] => self.key("key", one.key.as_str()),
            [Step::End(one)] => self.key("key", one.key.as_str()),
            _ => "a batch of checkouts' starts and ends".to_owned(),
        };
        let (answers, broke) = self
            .send_parts::<Vec<redis::Value>, _>(&subject, &parts, own.as_ref())
            .await;
        if broke {
            *own = None;
        }
        // Each part's replies, read step by step in the batch's order.
        let mut answers = answers;
        answers.sort_by_key(|(at, ..)| *at);
        let mut answers = answers.into_iter().peekable();
        let mut replies: Result<std::vec::IntoIter<redis::Value>, StoreError> =
            Err(StoreError::Unavailable("no answer for a step".into()));
        for (i, step) in batch.into_iter().enumerate() {
            if let Some((_, _, answer)) = answers.next_if(|(at, ..)| *at == i) {
                replies = answer.map(Vec::into_iter);
            }
            let reply = match replies.as_mut() {
                Ok(values) => read_plain(&step, values),
                Err(error) => Err(error.clone()),
            };
            match step {
                Step::Start(start) => {
                    let begin =
                        reply.and_then(|(tag, payload)| self.read_begin(&start.key, tag, &payload));
                    let took = matches!(begin, Ok(Begin::Locked(_))) && start.value.is_some();
                    if start.reply.send(begin).is_err() && took {
                        if let Some(value) = start.value {
                            self.release_orphan(start.key, value);
                        }
                    }
                }
                Step::End(end) => match reply {
                    Ok(("twin", _)) => self.report_twin(&end.key),
                    Ok(_) => {}
                    Err(_) => self.finish_later(end),
                },
            }
        }
    }

    /// What a start script said (`tag`, `payload`) of `key`: shared by the batched starts and a
    /// cart checkout's one-call start.
    pub(super) fn read_begin(
        &self,
        key: &IdempotencyKey,
        tag: &str,
        payload: &str,
    ) -> Result<Begin, StoreError> {
        let answer_key = || self.key("key", key.as_str());
        match tag {
            "answer" => decode_answer(payload)
                .map(Begin::Answer)
                .map_err(|what| StoreError::Unexpected {
                    key: answer_key(),
                    what,
                }),
            "junk_answer" => Err(StoreError::Unexpected {
                key: answer_key(),
                what: payload.to_owned(),
            }),
            "held" => Ok(Begin::Held),
            // Taken (a begin), or free (a look: nothing taken, the caller refuses and keeps it).
            "locked" | "free" => Ok(Begin::Locked(None)),
            "junk" => Err(StoreError::Unexpected {
                key: self.key("key", key.as_str()),
                what: "a lock value without expiry, which would hold the key for ever (Turnstile writes none)".into(),
            }),
            other => Err(StoreError::Unexpected {
                key: answer_key(),
                what: format!("script reply {other:?}"),
            }),
        }
    }

    /// Releases a lock a batch took for a caller that has gone.
    fn release_orphan(self: &Arc<Self>, key: IdempotencyKey, value: String) {
        self.finish_later(Finish::new(key, value, None, self.lock_ttl()));
    }
}

/// What one step's replies in a core's pipeline say ([`RedisStore::plain_parts`]), as the tags
/// [`RedisStore::read_begin`] reads: a start `locked` (taken, or already its own: a start may run
/// twice), `answer` and the answer any node stored, `held` (another checkout's lock), `junk` (a
/// lock value without expiry, which would hold the key for ever: Turnstile writes none) or
/// `junk_answer` and the error (a value of another type under the key); a look `free` instead of
/// `locked`. An end `done`, or `twin` when what its answer replaced was neither its own lock nor
/// gone nor that answer: another node answered the key, or is running it, while this node's
/// answer could not reach Redis (its lock expired meanwhile), and the key has, or is about to
/// have, an order on each of two nodes; the node reports it. A lock value starts with `~` (an
/// answer with its status, a digit), and a lock is the end's own when its value starts with the
/// one given (values end with `/`: see `STEPS`).
fn read_plain(
    step: &Step,
    replies: &mut impl Iterator<Item = redis::Value>,
) -> Result<(&'static str, String), StoreError> {
    use redis::Value;
    let missing = || StoreError::Unexpected {
        key: "a batch of checkouts' starts and ends".into(),
        what: "fewer replies than commands".into(),
    };
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|e| e.utf8_error().to_string());
    match step {
        Step::Start(start) => {
            let (value, ttl) = (replies.next().ok_or_else(missing)?, replies.next());
            let there = match value {
                Value::Nil => {
                    return Ok((
                        if start.value.is_some() {
                            "locked"
                        } else {
                            "free"
                        },
                        String::new(),
                    ))
                }
                Value::BulkString(bytes) => match text(bytes) {
                    Ok(there) => there,
                    Err(what) => return Ok(("junk_answer", what)),
                },
                Value::ServerError(error) => {
                    return Ok(("junk_answer", about_the_key(error.into())?))
                }
                other => return Ok(("junk_answer", format!("{other:?}"))),
            };
            if start.value.as_deref() == Some(there.as_str()) {
                return Ok(("locked", String::new()));
            }
            if !there.starts_with('~') {
                return Ok(("answer", there));
            }
            // -1: no expiry. (-2, gone: the other checkout's lock was released or expired
            // between the two commands, which Redis may run apart: held, retry.)
            match ttl {
                Some(Value::Int(-1)) => Ok(("junk", String::new())),
                _ => Ok(("held", String::new())),
            }
        }
        Step::End(end) if end.answer.is_none() => {
            replies.next().ok_or_else(missing)?;
            Err(StoreError::Unavailable(
                "a lock release goes through the finisher's script".into(),
            ))
        }
        Step::End(end) => {
            let ours = match replies.next().ok_or_else(missing)? {
                Value::Nil => true,
                Value::BulkString(bytes) => {
                    bytes.starts_with(end.value.as_bytes())
                        || end
                            .answer
                            .as_ref()
                            .is_some_and(|(answer, _)| bytes == encode_answer(answer).as_bytes())
                }
                Value::ServerError(error) => {
                    about_the_key(error.into())?;
                    false
                }
                _ => false,
            };
            Ok((if ours { "done" } else { "twin" }, String::new()))
        }
    }
}

/// A command's error among a pipeline's replies, as a failed call's would be read
/// ([`super::scripts::is_unexpected`]): a value of another type under the key (`WRONGTYPE`) is the
/// key's own (its text given back: junk under a start's key; an end's answer not stored over it,
/// a twin); anything else is Redis not taking the step now (`READONLY` during a failover, `OOM`
/// under `maxmemory`, `BUSY`, `LOADING` after a restart, a redirection): unavailable, so a start
/// answers `503` and an end goes to the finisher, which sends it again. Found by attack: read as
/// junk or a twin, an end refused for a second was never sent again, its lock expired, and another
/// node placed the key a second time.
fn about_the_key(error: redis::RedisError) -> Result<String, StoreError> {
    match super::scripts::is_unexpected(&error) {
        true => Ok(error.to_string()),
        false => Err(StoreError::Unavailable(format!(
            "Redis refused a step: {error}"
        ))),
    }
}

/// The (tag, payload) of each of a `STEPS` call's `count` steps from its reply: the codes, then
/// the payloads of the steps that have one ([`STEPS`]).
fn read_steps(
    count: usize,
    fields: Vec<String>,
) -> Result<Vec<(&'static str, String)>, StoreError> {
    let unexpected = |what: String| StoreError::Unexpected {
        key: "a batch of checkouts' starts and ends".into(),
        what,
    };
    let mut fields = fields.into_iter();
    let codes = fields.next().unwrap_or_default();
    if codes.len() != count {
        return Err(unexpected(format!(
            "{} step codes for {count} steps",
            codes.len()
        )));
    }
    codes
        .bytes()
        .map(|code| {
            let (_, tag, with_payload) = STEP_CODES
                .iter()
                .find(|(known, ..)| *known == code)
                .ok_or_else(|| unexpected(format!("step code {:?}", code as char)))?;
            let payload = match with_payload {
                true => fields
                    .next()
                    .ok_or_else(|| unexpected("a step's payload missing".into()))?,
                false => String::new(),
            };
            Ok((*tag, payload))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steps_reply_gives_each_end_its_tag_in_order() {
        let steps = read_steps(3, vec!["DTD".to_owned()]).unwrap();
        let tags: Vec<&str> = steps.iter().map(|(tag, _)| *tag).collect();
        assert_eq!(tags, ["done", "twin", "done"]);
        assert!(steps.iter().all(|(_, payload)| payload.is_empty()));
    }

    fn start(value: Option<&str>) -> Step {
        let (reply, _) = oneshot::channel();
        Step::Start(Start {
            key: IdempotencyKey::parse("k".to_owned()).expect("key"),
            value: value.map(str::to_owned),
            reply,
        })
    }

    fn end() -> Step {
        let key = IdempotencyKey::parse("k".to_owned()).expect("key");
        let answer = StoredAnswer {
            fingerprint: "f".into(),
            status: 201,
            body: "{}".into(),
            at_ms: 1,
        };
        Step::End(Finish::new(
            key,
            "~me/1/2/".to_owned(),
            Some((answer, 60_000)),
            Duration::from_secs(1),
        ))
    }

    fn read(step: &Step, replies: Vec<redis::Value>) -> Result<&'static str, StoreError> {
        read_plain(step, &mut replies.into_iter()).map(|(tag, _)| tag)
    }

    /// Found by attack: another checkout's lock released or expired between the start's `SET`
    /// and its `PTTL` (Redis may read a pipeline in pieces) read as junk, a `500`.
    #[test]
    fn a_lock_gone_between_a_starts_two_commands_is_held_and_only_no_expiry_is_junk() {
        let lock = redis::Value::BulkString(b"~other/1/1/".to_vec());
        for (ttl, tag) in [(-2, "held"), (1_500, "held"), (-1, "junk")] {
            let replies = vec![lock.clone(), redis::Value::Int(ttl)];
            assert_eq!(read(&start(Some("~me/1/2/")), replies).unwrap(), tag);
        }
        let own = vec![
            redis::Value::BulkString(b"~me/1/2/".to_vec()),
            redis::Value::Int(900),
        ];
        assert_eq!(read(&start(Some("~me/1/2/")), own).unwrap(), "locked");
        assert_eq!(
            read(&start(None), vec![redis::Value::Nil, redis::Value::Int(-2)]).unwrap(),
            "free"
        );
    }

    /// Found by attack: a write Redis refused for a moment (READONLY, OOM, BUSY, LOADING) read as
    /// junk at a start and as a twin at an end, whose answer was then never sent again.
    #[test]
    fn a_refusal_inside_the_pipeline_is_unavailable_and_a_wrong_type_is_the_keys() {
        let refused = || {
            redis::parse_redis_value(b"-READONLY You can't write against a read only replica.\r\n")
                .expect("an error reply")
        };
        let wrong = || {
            redis::parse_redis_value(
                b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            )
            .expect("an error reply")
        };
        let int = || redis::Value::Int(-2);
        assert!(matches!(
            read(&start(Some("~me/1/2/")), vec![refused(), int()]),
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            read(&end(), vec![refused()]),
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(
            read(&start(Some("~me/1/2/")), vec![wrong(), int()]).unwrap(),
            "junk_answer"
        );
        assert_eq!(read(&end(), vec![wrong()]).unwrap(), "twin");
    }

    #[test]
    fn a_steps_reply_that_does_not_fit_the_batch_fails_every_step() {
        for (count, reply) in [
            (2, vec!["D".to_owned()]),
            (1, vec!["L".to_owned()]),
            (1, vec!["?".to_owned()]),
            (1, vec![]),
        ] {
            assert!(read_steps(count, reply.clone()).is_err(), "{reply:?}");
        }
        let failed = RedisStore::step_replies(2, vec![(0, 2, Ok(vec!["DZ".to_owned()]))]);
        assert!(failed.iter().all(Result::is_err));
    }
}
