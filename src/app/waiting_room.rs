//! The waiting room (API.md, "Waiting room"): a product with an `admission_rate` lets buyers
//! through to checkout at that rate, in the order they queued.
//!
//! **Tickets carry their own schedule.** Taking a ticket (`POST /v1/products/{sku}/queue`) gives it
//! the next position in the SKU's queue and an admission time: the queue's last admission plus one
//! interval (`1 s / rate`, rounded up to the microsecond), or now if the queue has drained. So
//! admissions are at least one interval apart, in position order: any one-second window holds at
//! most `admission_rate` of them. The ticket is the position, the admission time, the interval and
//! the expiry (`--ticket-ttl` after admission), signed with HMAC-SHA256 under `--ticket-secret`:
//! any node checks it without asking anyone, and `GET /v1/queue/{ticket}` is computed from it and
//! the clock (`ahead`: the intervals left before its admission time, since every ticket not yet
//! admitted was scheduled one interval after the one before it). The SKU's sell-out is read from
//! the stock at each `GET`, so every ticket learns of it at once.
//!
//! **Where the queue lives.** One node without Redis: in this process (a restart empties the
//! waiting room: its tickets carry the process's epoch, and one of an earlier run is refused).
//! With Redis (`--redis-url`, so with several nodes): a hash per SKU (epoch, positions given, last
//! admission), moved by one script per ticket, so every node hands out one queue's positions.
//!
//! **A ticket is used once.** The checkout that holds the key's lock claims the ticket for its
//! `Idempotency-Key` before it holds any unit (a claim by the same key is the same use: a retry);
//! a checkout that ends without an order (refused, declined, the gateway timed out, nothing
//! recorded) gives the claim back, one that placed an order, or whose outcome is unknown, keeps it
//! until the ticket expires. Without Redis the claims are this process's; with Redis they are
//! keys next to the queue's hash (same slot on a Redis Cluster) that expire with the ticket, and
//! the claim checks the queue's epoch in the same script, so a ticket whose queue Redis lost (and
//! with it the ticket's claim) is refused rather than used twice.
//!
//! **The cost of a refusal.** A checkout of a queued SKU without a valid ticket is judged from the
//! header alone (no lock, no store): `429 queue_required` without one, `403 invalid_ticket` for a
//! forged, expired, early or other product's one; before that the key's kept answer is looked up
//! as a sold-out refusal does, since a replay comes before any ticket check.

use crate::domain::{IdempotencyKey, Sku};
use crate::sessions::redis::{RedisStore, StoreError, TicketClaim};
use crate::sync::lock;
use hmac::{Hmac, Mac};
use rustc_hash::FxHashMap;
use sha2::Sha256;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The first byte of a ticket's payload.
const TICKET_VERSION: u8 = 1;

/// Bytes of the HMAC kept in a ticket.
const MAC_BYTES: usize = 16;

/// A ticket, as signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The product queued for.
    pub sku: Sku,
    /// The queue's epoch: a queue made again (a restart without Redis, Redis emptied) has another.
    pub epoch: u64,
    /// The place in the queue, from 1.
    pub position: u64,
    /// When it is admitted (Unix µs).
    pub admit_us: i64,
    /// The queue's interval between admissions when it was taken (µs).
    pub interval_us: i64,
    /// When it stops being valid (Unix µs).
    pub expires_us: i64,
}

impl Ticket {
    fn payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(41 + self.sku.as_str().len());
        out.push(TICKET_VERSION);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.position.to_be_bytes());
        out.extend_from_slice(&self.admit_us.to_be_bytes());
        out.extend_from_slice(&self.interval_us.to_be_bytes());
        out.extend_from_slice(&self.expires_us.to_be_bytes());
        out.extend_from_slice(self.sku.as_str().as_bytes());
        out
    }

    /// The ticket as the client gets it: its payload and MAC, base64url without padding.
    pub fn encode(&self, secret: &[u8]) -> String {
        let mut bytes = self.payload();
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(&bytes);
        bytes.extend_from_slice(&mac.finalize().into_bytes()[..MAC_BYTES]);
        base64url(&bytes)
    }

    /// A ticket this secret signed, or `None` (not one, or forged).
    pub fn decode(text: &str, secret: &[u8]) -> Option<Self> {
        let bytes = from_base64url(text)?;
        if bytes.len() < 41 + 1 + MAC_BYTES || bytes[0] != TICKET_VERSION {
            return None;
        }
        let (payload, tag) = bytes.split_at(bytes.len() - MAC_BYTES);
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
        mac.update(payload);
        mac.verify_truncated_left(tag).ok()?;
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&payload[at..at + 8]);
            b
        };
        let sku = std::str::from_utf8(&payload[41..]).ok()?;
        Some(Self {
            sku: Sku::parse(sku).ok()?,
            epoch: u64::from_be_bytes(word(1)),
            position: u64::from_be_bytes(word(9)),
            admit_us: i64::from_be_bytes(word(17)),
            interval_us: i64::from_be_bytes(word(25)),
            expires_us: i64::from_be_bytes(word(33)),
        })
    }

    /// How many tickets not yet admitted are before this one at `now_us` (0 once admitted).
    pub fn ahead(&self, now_us: i64) -> u64 {
        if now_us >= self.admit_us {
            return 0;
        }
        // In i128: no field of a ticket can overflow it (the fuzz target makes every one).
        let wait = i128::from(self.admit_us) - i128::from(now_us);
        let interval = i128::from(self.interval_us.max(1));
        let intervals = (wait + interval - 1) / interval;
        u64::try_from(intervals - 1)
            .unwrap_or(u64::MAX)
            .min(self.position.saturating_sub(1))
    }
}

/// The interval between two admissions at `rate` per second, in µs, rounded up (never faster).
pub fn interval_us(rate: u32) -> i64 {
    let rate = i64::from(rate.max(1));
    (1_000_000 + rate - 1) / rate
}

/// The next admission of a queue whose last one was `last_us` (`None`: none yet).
pub fn next_admission(last_us: Option<i64>, now_us: i64, interval_us: i64) -> i64 {
    last_us.map_or(now_us, |last| now_us.max(last + interval_us))
}

/// Why a checkout's ticket is refused.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// No ticket given for a queued product: `429 queue_required`.
    #[error("{0}")]
    Required(String),
    /// Forged, expired, not yet admitted, another product's, already used: `403 invalid_ticket`.
    #[error("{0}")]
    Invalid(String),
    /// Its use could not be checked (Redis): `503 session_store_unavailable`.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn used() -> TicketError {
    TicketError::Invalid(
        "this Admission-Ticket was used by another checkout (another Idempotency-Key)".into(),
    )
}

/// Tickets claimed in this process, by (SKU, epoch, position): the key that uses each, when the
/// ticket expires (µs), and whether the key's order was placed.
type Uses = FxHashMap<(Sku, u64, u64), (IdempotencyKey, i64, bool)>;

/// One queue of this process (one node without Redis).
#[derive(Default)]
struct Schedule {
    given: u64,
    last_us: Option<i64>,
}

/// The waiting rooms of every product: their queues, and the tickets' uses.
pub struct WaitingRoom {
    secret: Vec<u8>,
    ttl_us: i64,
    /// This process's queues' epoch (without Redis).
    epoch: u64,
    queues: Mutex<FxHashMap<Sku, Schedule>>,
    /// Tickets claimed, by (SKU, epoch, position): the key that uses it and when the ticket
    /// expires (µs). Without Redis.
    uses: Mutex<Uses>,
    redis: Option<Arc<RedisStore>>,
    /// Claims made by this process (each try's claim is told apart by its number).
    claims: AtomicU64,
}

/// A ticket handed out.
pub struct Taken {
    /// The ticket as the client gets it.
    pub text: String,
    /// What it says.
    pub ticket: Ticket,
}

impl WaitingRoom {
    /// Waiting rooms signing with `secret`, whose tickets stay valid `ttl` after admission; their
    /// queues and claims in `redis` if given, else in this process.
    pub fn new(
        secret: Vec<u8>,
        ttl: std::time::Duration,
        redis: Option<Arc<RedisStore>>,
    ) -> Result<Self, crate::random::RandomError> {
        let mut epoch = [0u8; 8];
        epoch.copy_from_slice(&crate::random::random_bytes(8)?);
        Ok(Self {
            secret,
            ttl_us: i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX / 4),
            epoch: u64::from_be_bytes(epoch),
            queues: Mutex::default(),
            uses: Mutex::default(),
            redis,
            claims: AtomicU64::new(0),
        })
    }

    /// A ticket for `sku`'s queue, whose rate is `rate` per second.
    pub async fn take(&self, sku: &Sku, rate: u32, now_us: i64) -> Result<Taken, StoreError> {
        let interval = interval_us(rate);
        let (epoch, position, admit_us) = match &self.redis {
            Some(redis) => {
                redis
                    .take_ticket(
                        sku,
                        now_us,
                        interval,
                        // A queue Redis does not hold yet gets an epoch no earlier one had.
                        xxhash_rust::xxh3::xxh3_64_with_seed(&now_us.to_be_bytes(), self.epoch),
                        self.ttl_us / 1000 + 60_000,
                    )
                    .await?
            }
            None => {
                let mut queues = lock(&self.queues);
                let queue = queues.entry(sku.clone()).or_default();
                queue.given += 1;
                let admit = next_admission(queue.last_us, now_us, interval);
                queue.last_us = Some(admit);
                (self.epoch, queue.given, admit)
            }
        };
        let ticket = Ticket {
            sku: sku.clone(),
            epoch,
            position,
            admit_us,
            interval_us: interval,
            expires_us: admit_us.saturating_add(self.ttl_us),
        };
        Ok(Taken {
            text: ticket.encode(&self.secret),
            ticket,
        })
    }

    /// The ticket `text` says, if this room signed it for a queue it still has (without Redis,
    /// a ticket of an earlier run of the process is none).
    pub fn read(&self, text: &str) -> Option<Ticket> {
        Ticket::decode(text, &self.secret)
            .filter(|ticket| self.redis.is_some() || ticket.epoch == self.epoch)
    }

    /// Judges a checkout's ticket for `sku` from the header alone: `Ok` if it may be claimed.
    pub fn judge(&self, sku: &Sku, text: Option<&str>, now_us: i64) -> Result<Ticket, TicketError> {
        let Some(text) = text else {
            return Err(TicketError::Required(format!(
                "{sku} sells through its waiting room: take a ticket (POST /v1/products/{sku}/queue) and check out with its Admission-Ticket header once it is admitted"
            )));
        };
        let invalid = |why: String| Err(TicketError::Invalid(why));
        let Some(ticket) = Ticket::decode(text, &self.secret) else {
            return invalid("this Admission-Ticket is not one this shop signed".into());
        };
        if ticket.sku != *sku {
            return invalid(format!(
                "this Admission-Ticket is for {}, not {sku}",
                ticket.sku
            ));
        }
        if self.redis.is_none() && ticket.epoch != self.epoch {
            return invalid(
                "this Admission-Ticket is from an earlier run of the server: take a new one".into(),
            );
        }
        if now_us < ticket.admit_us {
            return invalid(format!(
                "this Admission-Ticket is not admitted yet ({} ahead of it); its GET /v1/queue/{{ticket}} says when",
                ticket.ahead(now_us)
            ));
        }
        if now_us >= ticket.expires_us {
            return invalid("this Admission-Ticket has expired: take a new one".into());
        }
        Ok(ticket)
    }

    /// Whether tickets are claimed in Redis (else in this process).
    pub fn claims_in_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// Claims `ticket` for the checkout under `key` (this try of it: `nonce`): once claimed by
    /// another key it is used. In Redis if the room has it, else [`Self::claim_in_process`].
    /// `true` when it took over an earlier try's claim under the key.
    async fn claim(
        &self,
        ticket: &Ticket,
        key: &IdempotencyKey,
        nonce: &str,
        now_us: i64,
    ) -> Result<bool, TicketError> {
        match &self.redis {
            Some(redis) => {
                let ttl_ms = ((ticket.expires_us - now_us) / 1000).max(1);
                match redis
                    .claim_ticket(&ticket.sku, ticket.epoch, ticket.position, key, nonce, ttl_ms)
                    .await?
                {
                    TicketClaim::Claimed => Ok(false),
                    TicketClaim::Retaken => Ok(true),
                    TicketClaim::Used => Err(used()),
                    TicketClaim::Stale => Err(TicketError::Invalid(
                        "this Admission-Ticket's queue is gone (its store was emptied): take a new one"
                            .into(),
                    )),
                }
            }
            None => self.claim_in_process(ticket, key, now_us).map(|()| false),
        }
    }

    /// [`Self::claim`] in this process (one node without Redis): synchronous, so it may run
    /// while the node's key table holds the key.
    pub fn claim_in_process(
        &self,
        ticket: &Ticket,
        key: &IdempotencyKey,
        now_us: i64,
    ) -> Result<(), TicketError> {
        let mut uses = lock(&self.uses);
        if uses.len() >= 1024 && uses.len().is_power_of_two() {
            uses.retain(|_, (_, expires, _)| *expires > now_us);
        }
        let id = (ticket.sku.clone(), ticket.epoch, ticket.position);
        match uses.get(&id) {
            Some((holder, expires, order_placed))
                if *expires > now_us && (holder != key || *order_placed) =>
            {
                Err(used())
            }
            _ => {
                uses.insert(id, (key.clone(), ticket.expires_us, false));
                Ok(())
            }
        }
    }

    /// Ends `key`'s claim of `ticket`: given back (its checkout placed no order), or marked used
    /// by the key's order (`used`), after which no checkout uses it again, not even under the same
    /// key once its answer is no longer kept. In the background with Redis (a claim not given back
    /// stays until the ticket expires: the buyer takes a new ticket).
    fn end_claim(&self, ticket: &Ticket, key: &IdempotencyKey, nonce: &str, used: bool) {
        match &self.redis {
            Some(redis) => redis.end_ticket_claim(
                ticket.sku.clone(),
                ticket.epoch,
                ticket.position,
                key.clone(),
                nonce.to_owned(),
                used,
            ),
            None => {
                let mut uses = lock(&self.uses);
                let id = (ticket.sku.clone(), ticket.epoch, ticket.position);
                if let Some((holder, _, order_placed)) = uses.get_mut(&id) {
                    if holder == key {
                        match used {
                            true => *order_placed = true,
                            false => {
                                uses.remove(&id);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A claimed ticket: given back when dropped, unless [`Self::used`] (the checkout placed an
/// order) or [`Self::keep`] (its outcome is unknown: its key's retry claims it again) was called.
/// Each try claims with a nonce of its own, and gives back only its own claim: a late give-back of
/// an earlier try under the same key (in the background, with Redis) never frees a retry's claim.
pub struct Claimed {
    room: Arc<WaitingRoom>,
    ticket: Ticket,
    key: IdempotencyKey,
    nonce: String,
    kept: bool,
}

impl Claimed {
    /// A claim of `ticket` by `key` (not made yet: [`Self::claim`]), given back when dropped.
    pub fn new(room: Arc<WaitingRoom>, ticket: Ticket, key: IdempotencyKey) -> Self {
        let nonce = format!(
            "{:x}.{:x}",
            room.epoch,
            room.claims.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            room,
            ticket,
            key,
            nonce,
            kept: false,
        }
    }

    /// Claims the ticket: once claimed by another key it is used. In Redis if the room has it,
    /// else in this process ([`WaitingRoom::claim_in_process`]). A claim taken over from an
    /// earlier try under the key is never given back (it expires with the ticket): that try may
    /// have placed the key's order on a node that died before marking the ticket used, and a
    /// give-back would free the ticket for another key.
    pub async fn claim(&mut self, now_us: i64) -> Result<(), TicketError> {
        let retaken = self
            .room
            .claim(&self.ticket, &self.key, &self.nonce, now_us)
            .await?;
        self.kept |= retaken;
        Ok(())
    }

    /// The claim stays as it is: the key's retry may claim the ticket again.
    pub fn keep(mut self) {
        self.kept = true;
    }

    /// The key's order was placed: the ticket is used for good.
    pub fn used(mut self) {
        self.kept = true;
        self.room
            .end_claim(&self.ticket, &self.key, &self.nonce, true);
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if !self.kept {
            self.room
                .end_claim(&self.ticket, &self.key, &self.nonce, false);
        }
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

fn from_base64url(text: &str) -> Option<Vec<u8>> {
    if text.len() > 1024 || text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            let value = ALPHABET.iter().position(|a| a == c)? as u32;
            n |= value << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
        // The bits past the last byte must be zero: one ticket, one text.
        let used_bits = 8 * (chunk.len() - 1);
        if n & ((1 << (24 - used_bits)) - 1) != 0 {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(position: u64) -> Ticket {
        Ticket {
            sku: Sku::parse("drop-1").unwrap(),
            epoch: 7,
            position,
            admit_us: 1_000_000 + position as i64,
            interval_us: 10_000,
            expires_us: 301_000_000,
        }
    }

    #[test]
    fn a_ticket_reads_back_and_any_change_to_it_is_forged() {
        let secret = b"secret-one";
        let text = ticket(3).encode(secret);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(Ticket::decode(&text, secret), Some(ticket(3)));
        assert_eq!(Ticket::decode(&text, b"secret-two"), None);
        for at in 0..text.len() {
            let mut changed = text.clone().into_bytes();
            changed[at] = if changed[at] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(changed).unwrap();
            assert_eq!(Ticket::decode(&changed, secret), None, "changed at {at}");
        }
        assert_eq!(Ticket::decode(&text[..text.len() - 1], secret), None);
        assert_eq!(Ticket::decode("", secret), None);
        assert_eq!(Ticket::decode("not a ticket!", secret), None);
    }

    #[test]
    fn base64url_round_trips_every_length() {
        for len in 0..40u8 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(from_base64url(&base64url(&bytes)).unwrap(), bytes);
        }
    }

    /// The schedule the tickets carry: in position order, and no one-second window (half open,
    /// starting anywhere) holds more than the rate, whatever the arrivals.
    #[test]
    fn admissions_never_exceed_the_rate_in_any_second() {
        for rate in [1u32, 3, 7, 100, 999, 1000, 4096] {
            let interval = interval_us(rate);
            let mut last = None;
            let mut admissions = Vec::new();
            let mut now = 0i64;
            for n in 0..3_000i64 {
                // Bursts and lulls.
                now += if n % 500 < 400 {
                    0
                } else {
                    1_500_000 / i64::from(rate)
                };
                let admit = next_admission(last, now, interval);
                assert!(admit >= now);
                last = Some(admit);
                admissions.push(admit);
            }
            assert!(admissions.windows(2).all(|w| w[0] < w[1]));
            for (i, start) in admissions.iter().enumerate() {
                let within = admissions[i..]
                    .iter()
                    .take_while(|t| **t < start + 1_000_000)
                    .count();
                assert!(within <= rate as usize, "rate {rate}: {within} in a second");
            }
        }
    }

    #[test]
    fn ahead_counts_the_intervals_before_admission() {
        let t = Ticket {
            admit_us: 1_000_000,
            interval_us: 10_000,
            position: 101,
            ..ticket(0)
        };
        assert_eq!(t.ahead(1_000_000), 0);
        assert_eq!(t.ahead(995_000), 0);
        assert_eq!(t.ahead(990_000), 0);
        assert_eq!(t.ahead(989_999), 1);
        assert_eq!(t.ahead(0), 99);
        assert_eq!(
            t.ahead(-10_000_000),
            100,
            "never more than the tickets before it"
        );
    }
}
