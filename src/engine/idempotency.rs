//! Idempotency keys: each key is in flight, or finished with the answer it got.
//!
//! Answers that placed an order are journaled with the order and kept here for the retention period
//! (they come back at start-up). Answers that placed nothing (`404`, `409 out_of_stock`) live only in
//! a bounded map: a flood of rejections costs no disk write and no unbounded memory.
//!
//! A request is known by its [`Fingerprint`]: xxh3-128 (seed 0, fixed: durable answers keep it, so
//! it must come out the same after a restart and in the next version) of the request's canonical
//! form, as 32 hex digits. Answers kept by earlier versions carry SHA-256 (64 hex digits); those are
//! compared by SHA-256 of the same canonical form, so a retry across an upgrade still replays. The
//! hash is not cryptographic: a client can make two bodies collide only under its own key, and
//! gets its own first answer back.

use super::records::StoredAnswer;
use crate::domain::IdempotencyKey;
use crate::sync::lock;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// How many independently locked parts each map is split into, so that concurrent requests with
/// different keys rarely wait for one another.
const SHARDS: usize = 64;

/// Limits of the map of answers that placed nothing.
#[derive(Debug, Clone, Copy)]
pub struct RejectionLimits {
    /// The most answers kept; the oldest go first. Bounds memory under a rejection flood.
    pub entries_max: usize,
    /// How long an answer is replayed; after that the key may be used afresh.
    pub age_ms_max: i64,
}

impl Default for RejectionLimits {
    fn default() -> Self {
        // 1 Mi answers of ~200 bytes is ~200 MiB at most; 10 minutes covers a client's retries.
        Self {
            entries_max: 1 << 20,
            age_ms_max: 10 * 60 * 1000,
        }
    }
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The key is new: it is now in flight, and the caller must `finish` or `abandon` it.
    Started,
    /// The key finished earlier with this same request: send this answer again.
    Replay(Arc<StoredAnswer>),
}

/// Why a key cannot be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A request with this key is still running.
    #[error("a request with this idempotency key is still running")]
    InUse,
    /// The key was used with another request.
    #[error("this idempotency key was used with another request")]
    Reused,
}

/// What a request's fingerprint is compared with: a stored answer's fingerprint text.
pub trait Fingerprinted {
    /// The fingerprint kept with a new answer.
    fn text(&self) -> &str;
    /// Whether `stored` (a kept answer's fingerprint) names this same request.
    fn matches(&self, stored: &str) -> bool;
}

/// A fingerprint given as its text (tests, and callers that compare texts as they are).
impl Fingerprinted for str {
    fn text(&self) -> &str {
        self
    }

    fn matches(&self, stored: &str) -> bool {
        stored == self
    }
}

/// The fingerprint of a request: xxh3-128 of its canonical form (see the module doc).
#[derive(Debug, Clone)]
pub struct Fingerprint {
    canonical: Vec<u8>,
    text: String,
}

impl Fingerprint {
    /// The fingerprint of a request whose canonical form is `canonical` (the same request must
    /// always give the same bytes: the checkout re-serialises the parsed body).
    pub fn of(canonical: Vec<u8>) -> Self {
        let digest = xxhash_rust::xxh3::xxh3_128(&canonical);
        Self {
            text: crate::random::hex(&digest.to_be_bytes()),
            canonical,
        }
    }

    /// The text kept with the answer.
    pub fn into_text(self) -> String {
        self.text
    }
}

impl Fingerprinted for Fingerprint {
    fn text(&self) -> &str {
        &self.text
    }

    fn matches(&self, stored: &str) -> bool {
        match stored.len() {
            // An earlier version's SHA-256: a retry across the upgrade replays all the same.
            64 => {
                use sha2::Digest;
                crate::random::hex(&sha2::Sha256::digest(&self.canonical)) == stored
            }
            _ => stored == self.text,
        }
    }
}

enum Slot {
    InFlight {
        fingerprint: String,
        /// The answer the key had before, past its retention: the new answer replaces it (a store
        /// that keeps answers under a unique key must drop the old one first). Put back if the
        /// request is abandoned, so the next attempt knows it too.
        expired: Option<Arc<StoredAnswer>>,
    },
    Finished(Arc<StoredAnswer>),
}

#[derive(Default)]
struct RejectionShard {
    answers: FxHashMap<IdempotencyKey, Arc<StoredAnswer>>,
    /// Keys in the order they were inserted, for eviction by age and size.
    order: VecDeque<IdempotencyKey>,
}

/// The idempotency keys of one process.
pub struct IdempotencyStore {
    slots: Box<[Mutex<FxHashMap<IdempotencyKey, Slot>>]>,
    rejections: Box<[Mutex<RejectionShard>]>,
    limits: RejectionLimits,
    /// How long an answer that placed an order is replayed; past it the key starts afresh.
    retention_ms: i64,
}

fn shard_of(key: &IdempotencyKey) -> usize {
    crate::sync::shard_of(key, SHARDS)
}

impl IdempotencyStore {
    /// An empty store whose answers that placed an order are replayed for `retention_ms`.
    pub fn new(limits: RejectionLimits, retention_ms: i64) -> Self {
        Self {
            slots: (0..SHARDS).map(|_| Mutex::default()).collect(),
            rejections: (0..SHARDS).map(|_| Mutex::default()).collect(),
            limits,
            retention_ms,
        }
    }

    /// Restores an answer that placed an order (from the journal at start-up).
    pub fn restore(&self, key: IdempotencyKey, answer: StoredAnswer) {
        let shard = shard_of(&key);
        lock(&self.slots[shard]).insert(key, Slot::Finished(Arc::new(answer)));
    }

    fn check<F: Fingerprinted + ?Sized>(
        fingerprint: &F,
        answer: &Arc<StoredAnswer>,
    ) -> Result<Begin, KeyError> {
        if fingerprint.matches(&answer.fingerprint) {
            Ok(Begin::Replay(Arc::clone(answer)))
        } else {
            Err(KeyError::Reused)
        }
    }

    /// Marks the key in flight, or says how it was used before.
    pub fn begin<F: Fingerprinted + ?Sized>(
        &self,
        key: &IdempotencyKey,
        fingerprint: &F,
        now_ms: i64,
    ) -> Result<Begin, KeyError> {
        let shard = shard_of(key);
        let mut slots = lock(&self.slots[shard]);
        let mut expired = None;
        match slots.get(key) {
            Some(Slot::InFlight { .. }) => return Err(KeyError::InUse),
            Some(Slot::Finished(answer)) if now_ms - answer.at_ms < self.retention_ms => {
                return Self::check(fingerprint, answer)
            }
            // Past its retention the key starts afresh (API.md).
            Some(Slot::Finished(answer)) => expired = Some(Arc::clone(answer)),
            None => {}
        }
        {
            let rejections = lock(&self.rejections[shard]);
            if let Some(answer) = rejections.answers.get(key) {
                if now_ms - answer.at_ms < self.limits.age_ms_max {
                    return Self::check(fingerprint, answer);
                }
            }
        }
        slots.insert(
            key.clone(),
            Slot::InFlight {
                fingerprint: fingerprint.text().to_owned(),
                expired,
            },
        );
        Ok(Begin::Started)
    }

    /// Records the answer of an in-flight key. `placed_order` answers are kept until purged (the
    /// caller journaled them first); others go to the bounded rejection map.
    pub fn finish(&self, key: &IdempotencyKey, answer: StoredAnswer, placed_order: bool) {
        let shard = shard_of(key);
        let answer = Arc::new(answer);
        let mut slots = lock(&self.slots[shard]);
        if placed_order {
            slots.insert(key.clone(), Slot::Finished(answer));
            return;
        }
        slots.remove(key);
        let mut rejections = lock(&self.rejections[shard]);
        let at_ms = answer.at_ms;
        if rejections.answers.insert(key.clone(), answer).is_none() {
            rejections.order.push_back(key.clone());
        }
        let entries_max = (self.limits.entries_max / SHARDS).max(1);
        while let Some(oldest) = rejections.order.front() {
            let expired = rejections
                .answers
                .get(oldest)
                .is_none_or(|a| at_ms - a.at_ms >= self.limits.age_ms_max);
            if rejections.order.len() <= entries_max && !expired {
                break;
            }
            if let Some(oldest) = rejections.order.pop_front() {
                rejections.answers.remove(&oldest);
            }
        }
    }

    /// Forgets an in-flight key whose request ended without an answer worth keeping (a `400` or a
    /// `503`): the client may retry with it.
    pub fn abandon(&self, key: &IdempotencyKey) {
        let shard = shard_of(key);
        let mut slots = lock(&self.slots[shard]);
        if let Some(Slot::InFlight { expired, .. }) = slots.get_mut(key) {
            match expired.take() {
                Some(answer) => {
                    slots.insert(key.clone(), Slot::Finished(answer));
                }
                None => {
                    slots.remove(key);
                }
            }
        }
    }

    /// The fingerprint of an in-flight key (for diagnostics and tests).
    pub fn in_flight_fingerprint(&self, key: &IdempotencyKey) -> Option<String> {
        match lock(&self.slots[shard_of(key)]).get(key) {
            Some(Slot::InFlight { fingerprint, .. }) => Some(fingerprint.clone()),
            _ => None,
        }
    }

    /// True if the in-flight key had an answer that passed its retention (the new answer replaces
    /// it).
    pub fn supersedes_expired(&self, key: &IdempotencyKey) -> bool {
        self.expired_at(key).is_some()
    }

    /// When the answer an in-flight key replaces was given, if it had one past its retention: a
    /// fresh use of the key must not be taken for the old one elsewhere (the gateway's key).
    pub fn expired_at(&self, key: &IdempotencyKey) -> Option<i64> {
        match lock(&self.slots[shard_of(key)]).get(key) {
            Some(Slot::InFlight {
                expired: Some(answer),
                ..
            }) => Some(answer.at_ms),
            _ => None,
        }
    }

    /// How many keys are held (in flight or with a kept answer).
    pub fn len(&self) -> usize {
        self.slots.iter().map(|s| lock(s).len()).sum()
    }

    /// True if no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops kept answers past their retention at `now_ms`; returns how many were dropped.
    pub fn purge_expired(&self, now_ms: i64) -> usize {
        let cutoff_ms = now_ms - self.retention_ms;
        let mut dropped = 0;
        for shard in self.slots.iter() {
            let mut slots = lock(shard);
            let before = slots.len();
            slots.retain(|_, slot| match slot {
                Slot::InFlight { .. } => true,
                Slot::Finished(answer) => answer.at_ms >= cutoff_ms,
            });
            dropped += before - slots.len();
        }
        dropped
    }

    /// The kept answers given at `since_ms` or later, newest first, `max` at most.
    pub fn recent_answers(
        &self,
        since_ms: i64,
        max: usize,
    ) -> Vec<(IdempotencyKey, Arc<StoredAnswer>)> {
        let mut recent = Vec::new();
        for shard in self.slots.iter() {
            for (key, slot) in lock(shard).iter() {
                if let Slot::Finished(answer) = slot {
                    if answer.at_ms >= since_ms {
                        recent.push((key.clone(), Arc::clone(answer)));
                    }
                }
            }
        }
        recent.sort_unstable_by_key(|(_, answer)| std::cmp::Reverse(answer.at_ms));
        recent.truncate(max);
        recent
    }

    /// How many answers the rejection map holds now.
    pub fn rejections_len(&self) -> usize {
        self.rejections.iter().map(|s| lock(s).answers.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> IdempotencyKey {
        IdempotencyKey::parse(k).unwrap()
    }

    fn answer(fingerprint: &str, status: u16, at_ms: i64) -> StoredAnswer {
        StoredAnswer {
            fingerprint: fingerprint.into(),
            status,
            body: format!("{{\"status\":{status}}}"),
            at_ms,
        }
    }

    #[test]
    fn a_fingerprint_is_the_same_in_every_run_and_version() {
        // Durable answers keep it: a change here would turn every retry after an upgrade into a
        // 422. The value is xxh3-128 (seed 0) of these bytes, big-endian, in hex.
        let canonical = br#"{"cart_id":null,"items":[{"sku":"sku-1","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}"#;
        let fingerprint = Fingerprint::of(canonical.to_vec());
        assert_eq!(fingerprint.text().len(), 32);
        assert_eq!(
            fingerprint.text(),
            crate::random::hex(&xxhash_rust::xxh3::xxh3_128(canonical).to_be_bytes())
        );
        assert_eq!(fingerprint.text(), PINNED_FINGERPRINT);
        assert!(!Fingerprint::of(b"{}".to_vec()).matches(fingerprint.text()));
    }

    /// xxh3-128 of the canonical form in the test above, as Python's `xxhash` package computes it
    /// (`xxhash.xxh3_128(bytes, seed=0).hexdigest()`): an implementation of its own agrees.
    const PINNED_FINGERPRINT: &str = "072a091d8e5a078426313cbbc8f9181b";

    #[test]
    fn an_answer_an_earlier_version_kept_under_sha256_replays_for_the_same_request_only() {
        use sha2::Digest;
        let canonical = b"{\"customer_id\":\"c\"}".to_vec();
        let old = crate::random::hex(&sha2::Sha256::digest(&canonical));
        let store = IdempotencyStore::new(RejectionLimits::default(), 1_000_000);
        let k = key("upgraded");
        store.restore(k.clone(), answer(&old, 201, 0));
        match store.begin(&k, &Fingerprint::of(canonical), 1) {
            Ok(Begin::Replay(a)) => assert_eq!(a.status, 201),
            other => panic!("expected a replay, got {other:?}"),
        }
        assert_eq!(
            store.begin(&k, &Fingerprint::of(b"{\"customer_id\":\"d\"}".to_vec()), 1),
            Err(KeyError::Reused)
        );
    }

    #[test]
    fn a_key_is_in_use_until_finished_then_replayed() {
        let store = IdempotencyStore::new(RejectionLimits::default(), 1_000_000);
        let k = key("k1");
        assert_eq!(store.begin(&k, "f", 0), Ok(Begin::Started));
        assert_eq!(store.begin(&k, "f", 0), Err(KeyError::InUse));
        assert_eq!(store.begin(&k, "other", 0), Err(KeyError::InUse));
        store.finish(&k, answer("f", 201, 0), true);
        match store.begin(&k, "f", 1) {
            Ok(Begin::Replay(a)) => assert_eq!(a.status, 201),
            other => panic!("expected a replay, got {other:?}"),
        }
        assert_eq!(store.begin(&k, "other", 1), Err(KeyError::Reused));
    }

    #[test]
    fn rejections_are_bounded_by_size_and_age() {
        let limits = RejectionLimits {
            entries_max: SHARDS * 2,
            age_ms_max: 1_000,
        };
        let store = IdempotencyStore::new(limits, 1_000_000);
        for i in 0..10_000 {
            let k = key(&format!("r{i}"));
            assert_eq!(store.begin(&k, "f", 0), Ok(Begin::Started));
            store.finish(&k, answer("f", 409, 0), false);
        }
        assert!(store.rejections_len() <= SHARDS * 2);
        let k = key("late");
        assert_eq!(store.begin(&k, "f", 0), Ok(Begin::Started));
        store.finish(&k, answer("f", 404, 0), false);
        assert!(matches!(store.begin(&k, "f", 999), Ok(Begin::Replay(_))));
        // Past its age the rejection is forgotten and the key starts afresh.
        assert_eq!(store.begin(&k, "f", 1_000), Ok(Begin::Started));
    }

    #[test]
    fn a_kept_answer_past_its_retention_starts_afresh() {
        let store = IdempotencyStore::new(RejectionLimits::default(), 1_000);
        let k = key("k");
        assert_eq!(store.begin(&k, "f", 0), Ok(Begin::Started));
        assert!(!store.supersedes_expired(&k));
        store.finish(&k, answer("f", 201, 0), true);
        assert!(matches!(store.begin(&k, "f", 999), Ok(Begin::Replay(_))));
        assert_eq!(store.begin(&k, "other", 1_000), Ok(Begin::Started));
        assert!(store.supersedes_expired(&k));
        // Abandoned, the key still knows it had an answer before.
        store.abandon(&k);
        assert_eq!(store.begin(&k, "other", 1_000), Ok(Begin::Started));
        assert!(store.supersedes_expired(&k));
    }

    #[test]
    fn abandon_frees_the_key() {
        let store = IdempotencyStore::new(RejectionLimits::default(), 1_000_000);
        let k = key("k");
        assert_eq!(store.begin(&k, "f", 0), Ok(Begin::Started));
        store.abandon(&k);
        assert_eq!(store.begin(&k, "g", 0), Ok(Begin::Started));
    }
}
