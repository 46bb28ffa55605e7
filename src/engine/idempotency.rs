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
//!
//! The rejection map is built for the flash sale's flood, where every request leaves one entry: an
//! entry is fixed-size and allocates nothing of its own. It is found by a 128-bit digest of its key
//! (xxh3-128 with a seed drawn at start-up, so nobody can aim two keys at one entry; two distinct
//! keys meet with odds of about 2⁻⁸⁸ in a full map), holds the request's fingerprint as its 128
//! bits, and its body as [`Bytes`]: a SKU's `out_of_stock` answer is rendered once and shared by
//! every entry that gives it. The map is split into 64 parts, each with its own lock and its own
//! share of the size limit; the part, too, comes from the seeded digest, so no client can aim a
//! flood at the part holding another client's answer and evict it young (the key table's shards
//! are an unseeded hash anyone can compute). Eviction, oldest first by size and age, walks a
//! queue of (digest, time) pairs that never touches the map's entries to find the next one due.
//! Each part's table grows as a flood fills it (taking it whole at the first rejection stalled
//! the worker on fresh pages: p99 45–50 ms against 4.5 ms, measured) and settles at a size it
//! keeps however long the flood lasts: with removals it doubles until it is at most half full, and
//! is then cleaned in place. The default, 14,336 answers a part (917,504 in all), takes ~190 MiB
//! at the cap (measured: the store alone; ~220 MiB of the server's resident memory).

use super::records::StoredAnswer;
use crate::domain::IdempotencyKey;
use crate::sync::lock;
use bytes::Bytes;
use rustc_hash::FxHashMap;
use serde::Serialize;
use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// How many independently locked parts each map is split into, so that concurrent requests with
/// different keys rarely wait for one another.
const SHARDS: usize = 64;

/// Limits of the map of answers that placed nothing.
#[derive(Debug, Clone, Copy)]
pub struct RejectionLimits {
    /// The most answers kept; the oldest go first. Bounds memory under a rejection flood. Kept
    /// in 64 parts of `entries_max / 64` answers each (at least one each), a part chosen by the
    /// key's seeded digest, so keys from many clients spread evenly over them.
    pub entries_max: usize,
    /// How long an answer is replayed; after that the key may be used afresh.
    pub age_ms_max: i64,
}

impl Default for RejectionLimits {
    fn default() -> Self {
        // 64 parts of 14,336 answers: each part's table settles at 32,768 slots (80 bytes each),
        // at most half full, where removals no longer make it grow: ~190–220 MiB at the cap (the
        // bodies shared); 14,336 is the most a table of that size holds that way. 10 minutes
        // covers a client's retries.
        Self {
            entries_max: SHARDS * 14_336,
            age_ms_max: 10 * 60 * 1000,
        }
    }
}

/// An answer given again under its key: its status and its body, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status of the first answer.
    pub status: u16,
    /// The body of the first answer.
    pub body: Bytes,
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The key is new: it is now in flight, and the caller must `finish` or `abandon` it.
    Started,
    /// The key finished earlier with this same request: send this answer again.
    Replay(Answer),
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

/// What a request's fingerprint is compared with: a stored answer's fingerprint text, or the 128
/// bits a rejection keeps.
pub trait Fingerprinted {
    /// The 128 bits a rejection keeps (xxh3-128 of the canonical form).
    fn digest(&self) -> u128;
    /// Whether `stored` (a kept answer's fingerprint text) names this same request.
    fn matches(&self, stored: &str) -> bool;
}

/// A fingerprint given as its text (tests, and callers that compare texts as they are).
impl Fingerprinted for str {
    fn digest(&self) -> u128 {
        parse_digest(self).unwrap_or_else(|| xxhash_rust::xxh3::xxh3_128(self.as_bytes()))
    }

    fn matches(&self, stored: &str) -> bool {
        stored == self
    }
}

/// The 128 bits behind a fingerprint text of 32 hex digits.
fn parse_digest(text: &str) -> Option<u128> {
    if text.len() == 32 {
        u128::from_str_radix(text, 16).ok()
    } else {
        None
    }
}

/// The text of a digest: 32 lowercase hex digits, big-endian.
pub fn digest_text(digest: u128) -> String {
    crate::random::hex(&digest.to_be_bytes())
}

thread_local! {
    /// The buffer canonical forms are written into (one per thread, reused: no allocation per
    /// request).
    static CANONICAL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The fingerprint of a request: xxh3-128 of its canonical form (see the module doc), its JSON
/// serialisation, so field order and white space in the body do not make two requests different.
#[derive(Debug)]
pub struct Fingerprint<'a, T: ?Sized> {
    digest: u128,
    request: &'a T,
}

impl<'a, T: Serialize + ?Sized> Fingerprint<'a, T> {
    /// The fingerprint of `request` (the same request must always serialise to the same bytes:
    /// the checkout passes the parsed body).
    pub fn of(request: &'a T) -> Self {
        let digest = CANONICAL.with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut buffer) => {
                buffer.clear();
                let digest = xxh3_of(&mut buffer, request);
                // A body far larger than usual is not kept for the next request.
                if buffer.capacity() > 64 * 1024 {
                    *buffer = Vec::new();
                }
                digest
            }
            Err(_) => xxh3_of(&mut Vec::new(), request),
        });
        Self { digest, request }
    }

    /// The text kept with a durable answer.
    pub fn text(&self) -> String {
        digest_text(self.digest)
    }
}

fn xxh3_of<T: Serialize + ?Sized>(buffer: &mut Vec<u8>, request: &T) -> u128 {
    // Serialising a parsed request into memory cannot fail.
    let _ = serde_json::to_writer(&mut *buffer, request);
    xxhash_rust::xxh3::xxh3_128(buffer)
}

impl<T: Serialize + ?Sized> Fingerprinted for Fingerprint<'_, T> {
    fn digest(&self) -> u128 {
        self.digest
    }

    fn matches(&self, stored: &str) -> bool {
        match stored.len() {
            // An earlier version's SHA-256: a retry across the upgrade replays all the same.
            64 => {
                use sha2::Digest;
                let canonical = serde_json::to_vec(self.request).unwrap_or_default();
                crate::random::hex(&sha2::Sha256::digest(&canonical)) == stored
            }
            _ => parse_digest(stored) == Some(self.digest),
        }
    }
}

enum Slot {
    InFlight {
        /// The request's fingerprint (for diagnostics).
        fingerprint: u128,
        /// The answer the key had before, past its retention: the new answer replaces it (a store
        /// that keeps answers under a unique key must drop the old one first). Put back if the
        /// request is abandoned, so the next attempt knows it too.
        expired: Option<Arc<StoredAnswer>>,
    },
    Finished(Arc<StoredAnswer>),
}

/// One kept rejection: fixed-size, its body shared.
struct Rejection {
    fingerprint: u128,
    at_ms: i64,
    status: u16,
    body: Bytes,
}

#[derive(Default)]
struct RejectionShard {
    /// By key digest.
    answers: FxHashMap<u128, Rejection>,
    /// Key digests (as two words: 24-byte pairs, not 32) in the order they were kept, with the
    /// time each was kept: an entry kept again later has a later pair too, and only the pair
    /// matching its time evicts it.
    order: VecDeque<([u64; 2], i64)>,
}

/// The idempotency keys of one process.
pub struct IdempotencyStore {
    slots: Box<[Mutex<FxHashMap<IdempotencyKey, Slot>>]>,
    rejections: Box<[Mutex<RejectionShard>]>,
    limits: RejectionLimits,
    /// How long an answer that placed an order is replayed; past it the key starts afresh.
    retention_ms: i64,
    /// The seed of the rejection map's key digests (this process's own).
    key_seed: u64,
}

fn words(digest: u128) -> [u64; 2] {
    [(digest >> 64) as u64, digest as u64]
}

fn digest_of(words: [u64; 2]) -> u128 {
    (u128::from(words[0]) << 64) | u128::from(words[1])
}

fn shard_of(key: &IdempotencyKey) -> usize {
    crate::sync::shard_of(key, SHARDS)
}

impl IdempotencyStore {
    /// An empty store whose answers that placed an order are replayed for `retention_ms`.
    pub fn new(limits: RejectionLimits, retention_ms: i64) -> Self {
        let mut seed = [0u8; 8];
        // Without the kernel's randomness the seed stays fixed; digests stay 128 bits wide.
        let _ = getrandom::getrandom(&mut seed);
        Self {
            slots: (0..SHARDS).map(|_| Mutex::default()).collect(),
            rejections: (0..SHARDS).map(|_| Mutex::default()).collect(),
            limits,
            retention_ms,
            key_seed: u64::from_le_bytes(seed),
        }
    }

    fn key_digest(&self, key: &IdempotencyKey) -> u128 {
        xxhash_rust::xxh3::xxh3_128_with_seed(key.as_str().as_bytes(), self.key_seed)
    }

    /// The part of the rejection map a key digest belongs to: from the seeded digest, so no
    /// client can aim keys at one part (the size limit is counted per part: a flood aimed at the
    /// part of another client's answer would evict it young).
    fn rejection_part(digest: u128) -> usize {
        (digest >> 64) as usize % SHARDS
    }

    /// Restores an answer that placed an order (from the journal at start-up).
    pub fn restore(&self, key: IdempotencyKey, answer: StoredAnswer) {
        let shard = shard_of(&key);
        lock(&self.slots[shard]).insert(key, Slot::Finished(Arc::new(answer)));
    }

    /// The answer of an order this node placed under `key` (kept durably, within retention), if
    /// any, compared with `fingerprint`, without taking the key: with several nodes, a node's own
    /// durable answer comes before whatever another node may have left in Redis under the same
    /// key (a node cut off from Redis past its lock's life may find another's answer there).
    pub fn placed_answer<F: Fingerprinted + ?Sized>(
        &self,
        key: &IdempotencyKey,
        fingerprint: &F,
        now_ms: i64,
    ) -> Option<Result<Answer, KeyError>> {
        let slots = lock(&self.slots[shard_of(key)]);
        match slots.get(key) {
            Some(Slot::Finished(answer)) if now_ms - answer.at_ms < self.retention_ms => {
                Some(if fingerprint.matches(&answer.fingerprint) {
                    Ok(Answer {
                        status: answer.status,
                        body: Bytes::copy_from_slice(answer.body.as_bytes()),
                    })
                } else {
                    Err(KeyError::Reused)
                })
            }
            _ => None,
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
                return if fingerprint.matches(&answer.fingerprint) {
                    Ok(Begin::Replay(Answer {
                        status: answer.status,
                        body: Bytes::copy_from_slice(answer.body.as_bytes()),
                    }))
                } else {
                    Err(KeyError::Reused)
                };
            }
            // Past its retention the key starts afresh (API.md).
            Some(Slot::Finished(answer)) => expired = Some(Arc::clone(answer)),
            None => {}
        }
        let digest = fingerprint.digest();
        {
            let key_digest = self.key_digest(key);
            let rejections = lock(&self.rejections[Self::rejection_part(key_digest)]);
            if let Some(kept) = rejections.answers.get(&key_digest) {
                if now_ms - kept.at_ms < self.limits.age_ms_max {
                    return if kept.fingerprint == digest {
                        Ok(Begin::Replay(Answer {
                            status: kept.status,
                            body: kept.body.clone(),
                        }))
                    } else {
                        Err(KeyError::Reused)
                    };
                }
            }
        }
        slots.insert(
            key.clone(),
            Slot::InFlight {
                fingerprint: digest,
                expired,
            },
        );
        Ok(Begin::Started)
    }

    /// Records the answer of an in-flight key that placed an order (the caller journaled it
    /// first): kept until purged.
    pub fn finish(&self, key: &IdempotencyKey, answer: StoredAnswer) {
        let shard = shard_of(key);
        lock(&self.slots[shard]).insert(key.clone(), Slot::Finished(Arc::new(answer)));
    }

    /// Records the answer of an in-flight key that placed nothing (`status` with `body`, given
    /// at `at_ms` to the request with fingerprint `fingerprint`), in the bounded rejection map.
    pub fn finish_rejected(
        &self,
        key: &IdempotencyKey,
        fingerprint: u128,
        status: u16,
        body: Bytes,
        at_ms: i64,
    ) {
        let shard = shard_of(key);
        let digest = self.key_digest(key);
        let mut slots = lock(&self.slots[shard]);
        slots.remove(key);
        // Taken before the key leaves `slots` unlocked, so a racing `begin` finds it in one of
        // the two (the order is always `slots`, then `rejections`).
        let mut rejections = lock(&self.rejections[Self::rejection_part(digest)]);
        drop(slots);
        let entries_max = (self.limits.entries_max / SHARDS).max(1);
        // Room first, so the table never holds more than `entries_max` when it needs a slot.
        while let Some(&(oldest, kept_at_ms)) = rejections.order.front() {
            let expired = at_ms - kept_at_ms >= self.limits.age_ms_max;
            if rejections.order.len() < entries_max && !expired {
                break;
            }
            rejections.order.pop_front();
            // Kept again since (a later pair stands for it), it stays.
            if let Entry::Occupied(kept) = rejections.answers.entry(digest_of(oldest)) {
                if kept.get().at_ms == kept_at_ms {
                    kept.remove();
                }
            }
        }
        let rejection = Rejection {
            fingerprint,
            at_ms,
            status,
            body,
        };
        rejections.answers.insert(digest, rejection);
        rejections.order.push_back((words(digest), at_ms));
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
    pub fn in_flight_fingerprint(&self, key: &IdempotencyKey) -> Option<u128> {
        match lock(&self.slots[shard_of(key)]).get(key) {
            Some(Slot::InFlight { fingerprint, .. }) => Some(*fingerprint),
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

    /// The part of the rejection map `key` belongs to (tests).
    #[cfg(test)]
    fn part_of(&self, key: &IdempotencyKey) -> usize {
        Self::rejection_part(self.key_digest(key))
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

    /// A store keeping at most `entries_max` rejections for `age_ms_max`, and answers that
    /// placed an order for `retention_ms`; with its limits.
    pub(super) fn store_with(
        entries_max: usize,
        age_ms_max: i64,
        retention_ms: i64,
    ) -> (RejectionLimits, IdempotencyStore) {
        let limits = RejectionLimits {
            entries_max,
            age_ms_max,
        };
        (limits, IdempotencyStore::new(limits, retention_ms))
    }

    /// A new key `k` refused at `at_ms` (the request's fingerprint `f`) with `status` and `body`.
    pub(super) fn refuse(
        store: &IdempotencyStore,
        k: &IdempotencyKey,
        f: &str,
        status: u16,
        body: Bytes,
        at_ms: i64,
    ) {
        assert_eq!(store.begin(k, f, at_ms), Ok(Begin::Started));
        store.finish_rejected(k, f.digest(), status, body, at_ms);
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
        // 422. The value is xxh3-128 (seed 0) of the request's canonical form, big-endian, in hex.
        #[derive(Serialize)]
        struct Line<'a> {
            sku: &'a str,
            quantity: i64,
        }
        #[derive(Serialize)]
        struct Request<'a> {
            cart_id: Option<&'a str>,
            items: Vec<Line<'a>>,
            customer_id: &'a str,
            payment_token: &'a str,
        }
        let request = Request {
            cart_id: None,
            items: vec![Line {
                sku: "sku-1",
                quantity: 1,
            }],
            customer_id: "c",
            payment_token: "tok_ok",
        };
        let canonical = br#"{"cart_id":null,"items":[{"sku":"sku-1","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}"#;
        let fingerprint = Fingerprint::of(&request);
        assert_eq!(fingerprint.text().len(), 32);
        assert_eq!(fingerprint.digest(), xxhash_rust::xxh3::xxh3_128(canonical));
        assert_eq!(fingerprint.text(), PINNED_FINGERPRINT);
        assert!(fingerprint.matches(PINNED_FINGERPRINT));
        assert!(!Fingerprint::of(&serde_json::json!({})).matches(PINNED_FINGERPRINT));
        // The same, again, on a thread whose buffer is fresh, and after a larger request.
        let again = std::thread::spawn(|| Fingerprint::of(&"x".repeat(100_000)).digest());
        assert_ne!(again.join().unwrap(), fingerprint.digest());
        assert_eq!(Fingerprint::of(&request).text(), PINNED_FINGERPRINT);
    }

    /// xxh3-128 of the canonical form in the test above, as Python's `xxhash` package computes it
    /// (`xxhash.xxh3_128(bytes, seed=0).hexdigest()`): an implementation of its own agrees.
    const PINNED_FINGERPRINT: &str = "072a091d8e5a078426313cbbc8f9181b";

    #[test]
    fn an_answer_an_earlier_version_kept_under_sha256_replays_for_the_same_request_only() {
        use sha2::Digest;
        let request = serde_json::json!({"customer_id": "c"});
        let old = crate::random::hex(&sha2::Sha256::digest(b"{\"customer_id\":\"c\"}"));
        let store = IdempotencyStore::new(RejectionLimits::default(), 1_000_000);
        let k = key("upgraded");
        store.restore(k.clone(), answer(&old, 201, 0));
        match store.begin(&k, &Fingerprint::of(&request), 1) {
            Ok(Begin::Replay(a)) => assert_eq!(a.status, 201),
            other => panic!("expected a replay, got {other:?}"),
        }
        assert_eq!(
            store.begin(
                &k,
                &Fingerprint::of(&serde_json::json!({"customer_id": "d"})),
                1
            ),
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
        store.finish(&k, answer("f", 201, 0));
        match store.begin(&k, "f", 1) {
            Ok(Begin::Replay(a)) => assert_eq!(a.status, 201),
            other => panic!("expected a replay, got {other:?}"),
        }
        assert_eq!(store.begin(&k, "other", 1), Err(KeyError::Reused));
    }

    #[test]
    fn rejections_are_bounded_by_size_and_age() {
        let (_, store) = store_with(SHARDS * 2, 1_000, 1_000_000);
        for i in 0..10_000 {
            let k = key(&format!("r{i}"));
            refuse(&store, &k, "f", 409, Bytes::from_static(b"{}"), 0);
        }
        assert!(store.rejections_len() <= SHARDS * 2);
        let k = key("late");
        refuse(&store, &k, "f", 404, Bytes::from_static(b"{\"e\":1}"), 0);
        match store.begin(&k, "f", 999) {
            Ok(Begin::Replay(a)) => {
                assert_eq!((a.status, &a.body[..]), (404, &b"{\"e\":1}"[..]));
            }
            other => panic!("expected a replay, got {other:?}"),
        }
        assert_eq!(store.begin(&k, "g", 999), Err(KeyError::Reused));
        // Past its age the rejection is forgotten and the key starts afresh.
        assert_eq!(store.begin(&k, "f", 1_000), Ok(Begin::Started));
    }

    #[test]
    fn a_rejection_kept_again_outlives_its_earlier_place_in_the_queue() {
        let (_, store) = store_with(SHARDS * 4, 1_000, 1_000_000);
        let k = key("again");
        // Another key in the same shard (eviction is per shard).
        let other = (0..)
            .map(|i| key(&format!("other-{i}")))
            .find(|o| store.part_of(o) == store.part_of(&k))
            .unwrap();
        let body = |b: &'static [u8]| Bytes::from_static(b);
        refuse(&store, &k, "f", 409, body(b"first"), 0);
        // Past its age the key starts afresh and is kept again, later in the queue.
        refuse(&store, &k, "g", 404, body(b"second"), 1_000);
        // The next rejection in the shard evicts the first pair, not the answer kept since.
        refuse(&store, &other, "f", 409, body(b"other"), 1_500);
        match store.begin(&k, "g", 1_500) {
            Ok(Begin::Replay(a)) => assert_eq!((a.status, &a.body[..]), (404, &b"second"[..])),
            other => panic!("expected a replay, got {other:?}"),
        }
        assert_eq!(store.rejections_len(), 2);
        // Its own pair evicts it once it is past its age.
        let third = (0..)
            .map(|i| key(&format!("third-{i}")))
            .find(|t| store.part_of(t) == store.part_of(&k))
            .unwrap();
        refuse(&store, &third, "f", 409, body(b"third"), 2_000);
        assert_eq!(store.rejections_len(), 2);
        assert_eq!(store.begin(&k, "h", 2_000), Ok(Begin::Started));
    }

    #[test]
    fn a_part_of_the_rejection_map_settles_at_a_size_it_keeps_under_a_flood() {
        // Proves: the flood's memory is bounded — once a part has held its limit for a while, its
        // table and queue keep their size through a flood many times larger (removals never make
        // it grow again), and it never holds more than its limit.
        let (_, store) = store_with(SHARDS * 64, 1_000_000, 1_000_000);
        let body = Bytes::from_static(b"{}");
        let keys = (0..).map(|i| key(&format!("flood-{i}")));
        // The most room the table and the queue showed while settling.
        let mut settled = (0, 0);
        for (n, k) in keys
            .filter(|k| store.part_of(k) == 0)
            .take(50_000)
            .enumerate()
        {
            refuse(&store, &k, "f", 409, body.clone(), 0);
            let part = lock(&store.rejections[0]);
            assert!(part.answers.len() <= 64 && part.order.len() <= 64);
            // The table's room (entries plus never-used slots) shrinks as removals leave marks
            // and comes back (up to the table's whole room) when it is cleaned in place, or when
            // a removal's neighbours let its slot be marked unused again; it would double if the
            // table grew. Thousands of rejections while settling clean it in place many times,
            // so their largest room is the whole room of the settled table.
            let now = (part.answers.capacity(), part.order.capacity());
            if n < 5_000 {
                settled = (settled.0.max(now.0), settled.1.max(now.1));
                continue;
            }
            assert!(
                now.0 <= settled.0 && now.1 <= settled.1,
                "after {n} rejections: {now:?}, settled at {settled:?}"
            );
        }
        assert_eq!(store.rejections_len(), 64);
    }

    #[test]
    fn a_kept_answer_past_its_retention_starts_afresh() {
        let store = IdempotencyStore::new(RejectionLimits::default(), 1_000);
        let k = key("k");
        assert_eq!(store.begin(&k, "f", 0), Ok(Begin::Started));
        assert!(!store.supersedes_expired(&k));
        store.finish(&k, answer("f", 201, 0));
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

/// Attacks on the rejection map and the key table: many threads, exact answers, and the store
/// run as a state machine against a simple model.
#[cfg(test)]
mod attack_tests {
    use super::tests::{refuse, store_with};
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    fn key(k: &str) -> IdempotencyKey {
        IdempotencyKey::parse(k).unwrap()
    }

    /// Keys that fall in `shard` of the key table (`shard_of`, which anyone can compute).
    fn keys_in_shard(shard: usize, prefix: &str, n: usize) -> Vec<IdempotencyKey> {
        (0..)
            .map(|i| key(&format!("{prefix}-{i}")))
            .filter(|k| shard_of(k) == shard)
            .take(n)
            .collect()
    }

    /// Keys that fall in `part` of `store`'s rejection map (known only inside the process).
    fn keys_in_part(
        store: &IdempotencyStore,
        part: usize,
        prefix: &str,
        n: usize,
    ) -> Vec<IdempotencyKey> {
        (0..)
            .map(|i| key(&format!("{prefix}-{i}")))
            .filter(|k| store.part_of(k) == part)
            .take(n)
            .collect()
    }

    fn per_shard_max(store: &IdempotencyStore) -> usize {
        (store.limits.entries_max / SHARDS).max(1)
    }

    /// Every key of a flood from many threads gets back its own answer, never another key's, and
    /// a different body under it is refused.
    #[test]
    fn a_flood_of_distinct_keys_from_many_threads_keeps_each_keys_own_answer() {
        let store = IdempotencyStore::new(RejectionLimits::default(), 1_000_000);
        let threads = 8;
        let per_thread = 5_000;
        std::thread::scope(|s| {
            for t in 0..threads {
                let store = &store;
                s.spawn(move || {
                    for i in 0..per_thread {
                        let name = format!("flood-{t}-{i}");
                        let k = key(&name);
                        assert_eq!(store.begin(&k, name.as_str(), 5), Ok(Begin::Started));
                        let status = if i % 2 == 0 { 409 } else { 404 };
                        store.finish_rejected(&k, name.digest(), status, Bytes::from(name), 5);
                    }
                });
            }
        });
        assert_eq!(store.rejections_len(), threads * per_thread);
        assert_eq!(store.len(), 0, "no key left in flight");
        std::thread::scope(|s| {
            for t in 0..threads {
                let store = &store;
                s.spawn(move || {
                    for i in 0..per_thread {
                        let name = format!("flood-{t}-{i}");
                        let k = key(&name);
                        let status = if i % 2 == 0 { 409 } else { 404 };
                        assert_eq!(
                            store.begin(&k, name.as_str(), 10),
                            Ok(Begin::Replay(Answer {
                                status,
                                body: Bytes::from(name.clone())
                            }))
                        );
                        let other = format!("{name}-other-body");
                        assert_eq!(store.begin(&k, other.as_str(), 10), Err(KeyError::Reused));
                    }
                });
            }
        });
    }

    /// Many threads race one key, round after round: exactly one runs at a time, the others get
    /// `InUse`, then the winner's answer byte for byte (or `Reused` under another body).
    #[test]
    fn racing_one_key_from_many_threads_runs_it_once_and_replays_the_winner() {
        let store = IdempotencyStore::new(RejectionLimits::default(), 1_000_000);
        let threads = 8;
        let rounds = 2_000;
        let barrier = Barrier::new(threads);
        let started = AtomicUsize::new(0);
        let running = AtomicUsize::new(0);
        // Whether a round's first run was abandoned (by whichever thread ran it).
        let abandoned: Vec<std::sync::atomic::AtomicBool> =
            (0..rounds).map(|_| Default::default()).collect();
        std::thread::scope(|s| {
            for t in 0..threads {
                let (store, barrier, started, running) = (&store, &barrier, &started, &running);
                let abandoned = &abandoned;
                s.spawn(move || {
                    for (round, first_abandoned) in abandoned.iter().enumerate() {
                        let k = key(&format!("race-{round}"));
                        // Half the threads send one body, half another.
                        let fp = format!("body-{}", t % 2);
                        // Some rounds place an order, some are refused, some are abandoned once.
                        let placed = round % 3 == 0;
                        let abandon_first = round % 3 == 2;
                        barrier.wait();
                        for attempt in 0.. {
                            assert!(attempt < 10_000_000, "round {round}: the key never settled");
                            match store.begin(&k, fp.as_str(), 1) {
                                Ok(Begin::Started) => {
                                    assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0);
                                    started.fetch_add(1, Ordering::SeqCst);
                                    std::thread::yield_now();
                                    running.fetch_sub(1, Ordering::SeqCst);
                                    if abandon_first
                                        && !first_abandoned.swap(true, Ordering::SeqCst)
                                    {
                                        store.abandon(&k);
                                        continue;
                                    }
                                    let body = format!("{round}:{fp}");
                                    if placed {
                                        store.finish(
                                            &k,
                                            StoredAnswer {
                                                fingerprint: fp.clone(),
                                                status: 201,
                                                body,
                                                at_ms: 1,
                                            },
                                        );
                                    } else {
                                        store.finish_rejected(
                                            &k,
                                            fp.as_str().digest(),
                                            409,
                                            Bytes::from(body),
                                            1,
                                        );
                                    }
                                }
                                Err(KeyError::InUse) => std::thread::yield_now(),
                                Ok(Begin::Replay(a)) => {
                                    let status = if placed { 201 } else { 409 };
                                    assert_eq!(a.status, status);
                                    assert_eq!(&a.body[..], format!("{round}:{fp}").as_bytes());
                                    break;
                                }
                                Err(KeyError::Reused) => {
                                    // The winner sent the other body: its answer names it.
                                    let mine = store.begin(&k, fp.as_str(), 1);
                                    assert_eq!(mine, Err(KeyError::Reused));
                                    break;
                                }
                            }
                        }
                        barrier.wait();
                        assert_eq!(store.in_flight_fingerprint(&k), None, "left in flight");
                    }
                });
            }
        });
        // One run per round, two in the rounds whose first run was abandoned.
        let abandoned_rounds = (0..rounds).filter(|r| r % 3 == 2).count();
        assert_eq!(started.load(Ordering::SeqCst), rounds + abandoned_rounds);
    }

    /// Under a flood of new keys from many threads the map never holds more than its limit, and
    /// its eviction queue stays bounded too.
    #[test]
    fn a_flood_from_many_threads_stays_within_entries_max_and_the_queue_is_bounded() {
        let (limits, store) = store_with(SHARDS * 16, 1_000_000, 1_000_000);
        std::thread::scope(|s| {
            for t in 0..4 {
                let store = &store;
                s.spawn(move || {
                    for i in 0..50_000i64 {
                        let k = key(&format!("f{t}-{i}"));
                        refuse(store, &k, "f", 409, Bytes::from_static(b"x"), i);
                        if i % 1_000 == 0 {
                            assert!(store.rejections_len() <= limits.entries_max);
                        }
                    }
                });
            }
        });
        assert!(store.rejections_len() <= limits.entries_max);
        for shard in store.rejections.iter() {
            let shard = lock(shard);
            assert!(shard.order.len() <= per_shard_max(&store));
            assert!(shard.answers.len() <= shard.order.len());
        }
        assert_eq!(store.len(), 0);
    }

    /// Contract: an answer younger than the age stays while the map is under its size limit,
    /// whatever keys other clients choose: keys aimed at the victim's shard of the key table
    /// (FxHash, which anyone can compute) spread over the rejection map's parts, which the seeded
    /// digest picks.
    #[test]
    fn a_young_answer_is_not_evicted_while_the_map_is_under_its_limit() {
        let limits = RejectionLimits::default();
        let store = IdempotencyStore::new(limits, 1_000_000);
        let victim = key("victim");
        refuse(&store, &victim, "v", 409, Bytes::from_static(b"mine"), 0);
        let aimed = keys_in_shard(shard_of(&victim), "aimed", limits.entries_max / SHARDS);
        for k in &aimed {
            refuse(&store, k, "f", 409, Bytes::from_static(b"x"), 1);
        }
        let held = store.rejections_len();
        assert!(held <= aimed.len() + 1);
        assert_eq!(
            store.begin(&victim, "v", 2),
            Ok(Begin::Replay(Answer {
                status: 409,
                body: Bytes::from_static(b"mine")
            })),
            "a 2 ms old answer was evicted with the map at {held} of {} entries",
            limits.entries_max
        );
    }

    /// Contract: the map is bounded by `entries_max`, counted in 64 parts of `entries_max / 64`
    /// (at least one each): below 64 parts' worth, by one answer a part.
    #[test]
    fn the_map_never_holds_more_than_entries_max_or_one_a_part() {
        let (limits, store) = store_with(8, 600_000, 1_000_000);
        for i in 0..10_000 {
            let k = key(&format!("k{i}"));
            refuse(&store, &k, "f", 409, Bytes::from_static(b"x"), 0);
        }
        assert!(
            store.rejections_len() <= limits.entries_max.max(SHARDS),
            "{} answers kept with entries_max {}",
            store.rejections_len(),
            limits.entries_max
        );
    }

    // ---- The store as a state machine against a model. ----

    const KEYS: usize = 6;
    const AGE: i64 = 100;
    const RETENTION: i64 = 250;

    #[derive(Debug, Clone)]
    enum Op {
        Begin { k: usize, f: usize, dt: i64 },
        Reject { k: usize, status: bool },
        Place { k: usize },
        Abandon { k: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..KEYS, 0..3usize, 0..120i64).prop_map(|(k, f, dt)| Op::Begin { k, f, dt }),
            2 => (0..KEYS, any::<bool>()).prop_map(|(k, status)| Op::Reject { k, status }),
            1 => (0..KEYS).prop_map(|k| Op::Place { k }),
            1 => (0..KEYS).prop_map(|k| Op::Abandon { k }),
        ]
    }

    #[derive(Debug, Clone)]
    struct Kept {
        fp: usize,
        status: u16,
        body: String,
        at: i64,
    }

    #[derive(Debug, Default, Clone)]
    struct ModelKey {
        in_flight: Option<(usize, Option<Kept>)>,
        placed: Option<Kept>,
        rejected: Option<Kept>,
    }

    fn fp_text(f: usize) -> String {
        format!("fingerprint-{f}")
    }

    /// Runs `ops`; with `exact`, the map never evicts by size and the store must answer as the
    /// model does; without, it may forget a rejection (size) but never answer wrongly.
    fn run(ops: Vec<Op>, limits: RejectionLimits, keys: usize, exact: bool) {
        let store = IdempotencyStore::new(limits, RETENTION);
        // Exact: keys wherever they fall; otherwise all in one part, so size eviction happens.
        let names: Vec<IdempotencyKey> = if exact {
            (0..keys).map(|i| key(&format!("m{i}"))).collect()
        } else {
            keys_in_part(&store, 7, "m", keys)
        };
        let mut model: Vec<ModelKey> = vec![ModelKey::default(); keys];
        let mut now = 0i64;
        let mut serial = 0u64;
        for op in ops {
            match op {
                Op::Begin { k, f, dt } => {
                    let k = k % keys;
                    now += dt;
                    let got = store.begin(&names[k], fp_text(f).as_str(), now);
                    let m = &mut model[k];
                    let young_placed = m.placed.clone().filter(|p| now - p.at < RETENTION);
                    let young_rejected = m.rejected.clone().filter(|r| now - r.at < AGE);
                    let expected: Result<Begin, KeyError> = if m.in_flight.is_some() {
                        Err(KeyError::InUse)
                    } else if let Some(kept) = young_placed.as_ref().or(young_rejected.as_ref()) {
                        // A placed order's answer first, as the store looks.
                        if kept.fp == f {
                            Ok(Begin::Replay(Answer {
                                status: kept.status,
                                body: Bytes::from(kept.body.clone()),
                            }))
                        } else {
                            Err(KeyError::Reused)
                        }
                    } else {
                        Ok(Begin::Started)
                    };
                    let forgotten = !exact
                        && young_placed.is_none()
                        && young_rejected.is_some()
                        && m.in_flight.is_none()
                        && got == Ok(Begin::Started);
                    if forgotten {
                        // Evicted for size: allowed, and the key starts afresh.
                        m.rejected = None;
                    } else {
                        assert_eq!(got, expected, "begin({k}, {f}) at {now}: {m:?}");
                    }
                    if got == Ok(Begin::Started) {
                        m.in_flight = Some((f, m.placed.take()));
                    }
                }
                Op::Reject { k, status } => {
                    let k = k % keys;
                    let m = &mut model[k];
                    if let Some((f, _)) = m.in_flight.take() {
                        serial += 1;
                        let status = if status { 409 } else { 404 };
                        let body = format!("{{\"n\":{serial}}}");
                        store.finish_rejected(
                            &names[k],
                            fp_text(f).as_str().digest(),
                            status,
                            Bytes::from(body.clone()),
                            now,
                        );
                        m.placed = None;
                        m.rejected = Some(Kept {
                            fp: f,
                            status,
                            body,
                            at: now,
                        });
                    }
                }
                Op::Place { k } => {
                    let k = k % keys;
                    let m = &mut model[k];
                    if let Some((f, _)) = m.in_flight.take() {
                        serial += 1;
                        let body = format!("{{\"order\":{serial}}}");
                        store.finish(
                            &names[k],
                            StoredAnswer {
                                fingerprint: fp_text(f),
                                status: 201,
                                body: body.clone(),
                                at_ms: now,
                            },
                        );
                        m.placed = Some(Kept {
                            fp: f,
                            status: 201,
                            body,
                            at: now,
                        });
                    }
                }
                Op::Abandon { k } => {
                    let k = k % keys;
                    let m = &mut model[k];
                    if let Some((_, expired)) = m.in_flight.take() {
                        store.abandon(&names[k]);
                        m.placed = expired;
                    }
                }
            }
            assert!(store.rejections_len() <= limits.entries_max.max(SHARDS));
            for shard in store.rejections.iter() {
                let shard = lock(shard);
                assert!(shard.answers.len() <= shard.order.len());
                assert!(shard.order.len() <= per_shard_max(&store));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn the_store_answers_as_the_model_does(ops in proptest::collection::vec(op(), 1..200)) {
            let limits = RejectionLimits { entries_max: 1 << 20, age_ms_max: AGE };
            run(ops, limits, KEYS, true);
        }

        #[test]
        fn under_size_eviction_the_store_forgets_but_never_answers_wrongly(
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            // Two entries a shard, six keys in one shard: size eviction is frequent.
            let limits = RejectionLimits { entries_max: SHARDS * 2, age_ms_max: AGE };
            run(ops, limits, KEYS, false);
        }

        /// The thread-local buffer gives the digest of exactly the request's JSON, whatever came
        /// before it on that thread (a larger request, a smaller one).
        #[test]
        fn a_fingerprint_is_xxh3_of_exactly_the_requests_json(
            texts in proptest::collection::vec("[ -~]{0,300}", 1..20),
        ) {
            for text in &texts {
                let value = serde_json::json!({"items": [{"sku": text, "quantity": 1}], "c": text});
                let expected = xxhash_rust::xxh3::xxh3_128(&serde_json::to_vec(&value).unwrap());
                prop_assert_eq!(Fingerprint::of(&value).digest(), expected);
                prop_assert!(Fingerprint::of(&value).matches(&digest_text(expected)));
            }
        }
    }

    /// Fingerprints taken on many threads at once are each of their own request.
    #[test]
    fn fingerprints_from_many_threads_are_each_of_their_own_request() {
        let expected: HashMap<usize, u128> = (0..2_000)
            .map(|i| {
                let v =
                    serde_json::json!({"customer_id": format!("c{i}"), "pad": "y".repeat(i % 97)});
                (
                    i,
                    xxhash_rust::xxh3::xxh3_128(&serde_json::to_vec(&v).unwrap()),
                )
            })
            .collect();
        std::thread::scope(|s| {
            for t in 0..8 {
                let expected = &expected;
                s.spawn(move || {
                    for i in (t..2_000).step_by(8) {
                        let v = serde_json::json!({"customer_id": format!("c{i}"), "pad": "y".repeat(i % 97)});
                        assert_eq!(Fingerprint::of(&v).digest(), expected[&i]);
                    }
                });
            }
        });
    }
}
