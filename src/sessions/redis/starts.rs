//! Checkouts' starts, batched per core: the look of a sold-out refusal (`peek`) and the start of
//! a checkout naming its items (`begin`: the answer, else the lock) go through the queue of the
//! calling thread's core slot (`sync::PerCore`). Each core's queue has a task of its own, started
//! on that core's runtime at its first start, with a Redis connection of its own made there: a
//! per-core worker's starts, their batching, the connection's socket and the wake-ups all stay on
//! its thread. The task sends everything queued as one script call (up to
//! [`STARTS_PER_CALL_MAX`]), then the next batch once that call is answered: an idle node sends a
//! start at once, a busy one many per round trip, and Redis runs one script for all of them —
//! what made Redis the ceiling of a sold-out flood and of steady checkouts. On a Redis Cluster a
//! script touches one slot: the batch goes one script per key, concurrently
//! ([`RedisStore::slot_parts`]). A checkout naming a cart starts alone (its cart read in the same
//! script).
//!
//! A core's own connection is made only while the shared one is up (the supervisor's: the
//! node's view of whether Redis answers); a batch it fails to carry is sent again on the shared
//! connection, with its reconnection wait ([`RedisStore::run`]), and a broken one is dropped (the
//! next batch makes a new one; one that cannot be made is tried again after
//! [`OWN_CONNECTION_RETRY`], the shared connection carrying the core's starts meanwhile). Every start may run twice (`STARTS` takes a lock it already holds
//! again).
//!
//! A start whose caller has gone (the request was dropped) while its batch ran, and which took
//! the lock, has that lock released: the caller's own release may have reached Redis before the
//! batch did.

use super::connection::Connection;
use super::*;
use crate::sync::PerCore;
use std::sync::OnceLock;
use tokio::sync::oneshot;

/// Starts queued at most; past it a start is sent alone.
const STARTS_QUEUED_MAX: usize = 65_536;

/// Starts sent in one call at most.
const STARTS_PER_CALL_MAX: usize = 256;

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

/// One core's queue of starts: its sending task is started at the core's first start.
#[derive(Default)]
struct Lane {
    queue: OnceLock<tokio::sync::mpsc::Sender<Start>>,
    stop: tokio::sync::Notify,
}

/// The per-core queues of starts.
pub(super) struct Starts {
    lanes: PerCore<Lane>,
}

impl Starts {
    pub(super) fn new() -> Self {
        Self {
            lanes: PerCore::default(),
        }
    }

    /// Ends the sending tasks; starts queued then fail as unavailable.
    pub(super) fn stop(&self) {
        for lane in self.lanes.iter() {
            lane.stop.notify_one();
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
            let (queue, receiver) = tokio::sync::mpsc::channel(STARTS_QUEUED_MAX);
            let store = Arc::clone(self);
            tokio::spawn(async move { store.send_starts(lane_index, receiver).await });
            queue
        });
        let (reply, answer) = oneshot::channel();
        let start = Start {
            key: key.clone(),
            value,
            reply,
        };
        match queue.try_send(start) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(start)) => {
                self.send_batch(vec![start], &mut None).await;
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return Err(stopping()),
        }
        answer.await.unwrap_or_else(|_| Err(stopping()))
    }

    async fn send_starts(
        &self,
        lane_index: usize,
        mut receiver: tokio::sync::mpsc::Receiver<Start>,
    ) {
        let Some(lane) = self.starts.lanes.iter().nth(lane_index) else {
            return;
        };
        let mut own: Option<Connection> = None;
        // A failed attempt at its own connection is not made again for a while: meanwhile the
        // shared connection carries this core's starts, and no batch waits on a slow connect.
        let mut next_try = tokio::time::Instant::now();
        let mut batch = Vec::with_capacity(STARTS_PER_CALL_MAX);
        loop {
            tokio::select! {
                taken = receiver.recv_many(&mut batch, STARTS_PER_CALL_MAX) => {
                    if taken == 0 {
                        return;
                    }
                }
                () = lane.stop.notified() => return,
            }
            let now = tokio::time::Instant::now();
            if own.is_none() && now >= next_try && self.connection.load().is_some() {
                own = match tokio::time::timeout(self.timeout, self.client.connect()).await {
                    Ok(Ok(connection)) => Some(connection),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "a core's own Redis connection failed; its starts go on the shared one");
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

    /// One script call per part of `batch` (one with one server), on `own` (a core's own
    /// connection) if given, else (or once `own` failed) on the shared one; every start answered.
    async fn send_batch(&self, batch: Vec<Start>, own: &mut Option<Connection>) {
        let parts: Vec<(usize, usize, ScriptInvocation<'_>)> = self
            .slot_parts(&batch)
            .into_iter()
            .map(|(at, part)| {
                let mut invocation = self.scripts.starts.prepare_invoke();
                invocation.arg(self.lock_ttl_ms);
                for start in part {
                    invocation
                        .key(self.key("answer", start.key.as_str()))
                        .key(self.key("lock", start.key.as_str()))
                        .arg(start.value.as_deref().unwrap_or(""));
                }
                (at, part.len(), invocation)
            })
            .collect();
        let subject = match batch.as_slice() {
            [one] => self.key("answer", one.key.as_str()),
            _ => "a batch of checkouts' starts".to_owned(),
        };
        let (answers, broke) = self
            .send_parts::<Vec<String>>(&subject, &parts, own.as_ref())
            .await;
        if broke {
            *own = None;
        }
        let mut replies: Vec<Option<Result<Begin, StoreError>>> =
            std::iter::repeat_with(|| None).take(batch.len()).collect();
        for (at, count, answer) in answers {
            for (i, slot) in replies.iter_mut().enumerate().skip(at).take(count) {
                *slot = Some(match &answer {
                    Ok(fields) => self.read_start(&batch[i].key, fields, i - at),
                    Err(error) => Err(error.clone()),
                });
            }
        }
        for (start, reply) in batch.into_iter().zip(replies) {
            let reply = reply
                .unwrap_or_else(|| Err(StoreError::Unavailable("no answer for a start".into())));
            let took = matches!(reply, Ok(Begin::Locked(_))) && start.value.is_some();
            if start.reply.send(reply).is_err() && took {
                if let Some(value) = start.value {
                    self.release_orphan(start.key, value);
                }
            }
        }
    }

    /// Item `index` of a batch's reply (a tag and its payload per start).
    fn read_start(
        &self,
        key: &IdempotencyKey,
        fields: &[String],
        index: usize,
    ) -> Result<Begin, StoreError> {
        let tag = fields.get(2 * index).map_or("", String::as_str);
        let payload = fields.get(2 * index + 1).map_or("", String::as_str);
        self.read_begin(key, tag, payload)
    }

    /// What a start script said (`tag`, `payload`) of `key`: shared by the batched starts and a
    /// cart checkout's one-call start.
    pub(super) fn read_begin(
        &self,
        key: &IdempotencyKey,
        tag: &str,
        payload: &str,
    ) -> Result<Begin, StoreError> {
        let answer_key = || self.key("answer", key.as_str());
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
                key: self.key("lock", key.as_str()),
                what: "a value Turnstile did not write (another type, or a value without expiry), which would hold the key for ever".into(),
            }),
            other => Err(StoreError::Unexpected {
                key: answer_key(),
                what: format!("script reply {other:?}"),
            }),
        }
    }

    /// Releases a lock a batch took for a caller that has gone.
    fn release_orphan(&self, key: IdempotencyKey, value: String) {
        let lock_ttl = self.lock_ttl();
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = self
            .finishes
            .try_send(Finish::new(key, value, None, lock_ttl))
        {
            tracing::debug!("the finishers' queue is full; a lock taken for a dropped request expires by itself");
        }
    }
}
