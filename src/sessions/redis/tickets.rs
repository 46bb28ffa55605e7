//! The waiting rooms' queues and tickets' claims in Redis (`app::waiting_room`), so that every
//! node hands out positions of one queue per SKU and a ticket is used once whichever node checks
//! it out.
//!
//! A queue is a hash (`<prefix>queue:<sku>`: `epoch`, `given`, `last` admission in Unix µs) that
//! lives as long as its last ticket could be valid; a claim is a string next to it
//! (`<prefix>queue:<sku>/<epoch>/<position>`, the key that uses the ticket) that expires with its
//! ticket. On a Redis Cluster both carry the SKU's hash tag, so one script reaches both.

use super::*;

/// What a ticket's claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketClaim {
    /// Claimed for this key.
    Claimed,
    /// Claimed for this key, over an earlier try's claim under it (that try may have placed the
    /// key's order on a node that died before marking the ticket used).
    Retaken,
    /// Another key uses it.
    Used,
    /// Its queue is not the one Redis holds (Redis lost it, and with it the ticket's claims).
    Stale,
}

/// Takes the next place in a SKU's queue. KEYS[1] = the queue; ARGV = now µs, the interval µs, a
/// fresh epoch (for a queue not held yet), how long to keep the queue past its last admission
/// (ms). Returns the epoch, the position and the admission time (µs, as text: Lua numbers are
/// doubles, exact to 2^53, far past any Unix µs).
const TAKE: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local position = redis.call('HINCRBY', KEYS[1], 'given', 1)
local now = tonumber(ARGV[1])
local last = redis.call('HGET', KEYS[1], 'last')
local admit = now
if last then admit = math.max(now, tonumber(last) + tonumber(ARGV[2])) end
local text = string.format('%.0f', admit)
redis.call('HSET', KEYS[1], 'last', text)
redis.call('PEXPIRE', KEYS[1], math.floor((admit - now) / 1000) + tonumber(ARGV[4]))
return {epoch, position, text}
";

/// Claims a ticket. KEYS[1] = its queue, KEYS[2] = its claim; ARGV = its epoch, the key, the
/// claim's TTL in ms, the try's nonce. The claim is `c <key> <nonce>` while a checkout under the
/// key runs (the same key claims again, a retry: the claim becomes the retry's, so an earlier
/// try's late give-back misses it), `u <key>` once the key's order is placed (a key has no space:
/// the two forms never meet) (used: a retry under the key is a replay while the key's answer is
/// kept, and past that the ticket stays used). A bare `<key>` is a claim of an earlier version.
/// A claim's life is never shortened (a node's clock running fast must not end it early).
const CLAIM: &str = r"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 'stale' end
local mine = 'c ' .. ARGV[2] .. ' '
local there = redis.call('GET', KEYS[2])
if there and there ~= ARGV[2] and string.sub(there, 1, #mine) ~= mine then return 'used' end
local ttl = tonumber(ARGV[3])
if there then
  local left = redis.call('PTTL', KEYS[2])
  if left > ttl then ttl = left end
end
redis.call('SET', KEYS[2], mine .. ARGV[4], 'PX', ttl)
if there then return 'retaken' end
return 'claimed'
";

/// Marks a claim used by its key's order. KEYS[1] = the claim; ARGV[1] = the key (any try's
/// claim under it: only one try of a key places its order).
const USED: &str = r"
local mine = 'c ' .. ARGV[1] .. ' '
local there = redis.call('GET', KEYS[1])
if there and (there == ARGV[1] or string.sub(there, 1, #mine) == mine) then
  redis.call('SET', KEYS[1], 'u ' .. ARGV[1], 'KEEPTTL')
end
return 1
";

/// Gives a claim back if it is still this try's. KEYS[1] = the claim; ARGV = the key, the nonce.
const RELEASE: &str = r"
local there = redis.call('GET', KEYS[1])
if there == 'c ' .. ARGV[1] .. ' ' .. ARGV[2] or there == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

pub(super) struct TicketScripts {
    take: Script,
    claim: Script,
    used: Script,
    release: Script,
}

impl TicketScripts {
    pub(super) fn new() -> Self {
        Self {
            take: Script::new(TAKE),
            claim: Script::new(CLAIM),
            used: Script::new(USED),
            release: Script::new(RELEASE),
        }
    }
}

impl RedisStore {
    fn queue_key(&self, sku: &Sku) -> String {
        self.key("queue", sku.as_str())
    }

    fn claim_key(&self, sku: &Sku, epoch: u64, position: u64) -> String {
        // A SKU has no '/': no claim's key is another SKU's queue.
        format!("{}/{epoch}/{position}", self.queue_key(sku))
    }

    /// The next place in `sku`'s queue: its epoch, position and admission time (µs).
    pub async fn take_ticket(
        &self,
        sku: &Sku,
        now_us: i64,
        interval_us: i64,
        fresh_epoch: u64,
        keep_ms: i64,
    ) -> Result<(u64, u64, i64), StoreError> {
        let queue = self.queue_key(sku);
        let mut invocation = self.tickets.take.key(&queue);
        invocation
            .arg(now_us)
            .arg(interval_us)
            .arg(fresh_epoch.to_string())
            .arg(keep_ms);
        let (epoch, position, admit): (String, u64, String) = self.run(&queue, &invocation).await?;
        let unexpected = |what: String| StoreError::Unexpected {
            key: queue.clone(),
            what,
        };
        Ok((
            epoch
                .parse()
                .map_err(|_| unexpected(format!("epoch {epoch:?}")))?,
            position,
            admit
                .parse()
                .map_err(|_| unexpected(format!("last admission {admit:?}")))?,
        ))
    }

    /// Claims a ticket for `key` (its try `nonce`) until `ttl_ms` from now.
    pub async fn claim_ticket(
        &self,
        sku: &Sku,
        epoch: u64,
        position: u64,
        key: &IdempotencyKey,
        nonce: &str,
        ttl_ms: i64,
    ) -> Result<TicketClaim, StoreError> {
        let claim = self.claim_key(sku, epoch, position);
        let mut invocation = self.tickets.claim.key(self.queue_key(sku));
        invocation
            .key(&claim)
            .arg(epoch.to_string())
            .arg(key.as_str())
            .arg(ttl_ms.max(1))
            .arg(nonce);
        let found: String = self.run(&claim, &invocation).await?;
        match found.as_str() {
            "claimed" => Ok(TicketClaim::Claimed),
            "retaken" => Ok(TicketClaim::Retaken),
            "used" => Ok(TicketClaim::Used),
            "stale" => Ok(TicketClaim::Stale),
            other => Err(StoreError::Unexpected {
                key: claim,
                what: format!("the claim script answered {other:?}"),
            }),
        }
    }

    /// Gives the claim of a ticket by `key`'s try `nonce` back (`used`: false), or marks it used
    /// by the key's order (`used`: true), in the background (a claim not given back stays until
    /// its ticket expires).
    pub fn end_ticket_claim(
        self: &Arc<Self>,
        sku: Sku,
        epoch: u64,
        position: u64,
        key: IdempotencyKey,
        nonce: String,
        used: bool,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = Arc::clone(self);
        runtime.spawn(async move {
            let claim = store.claim_key(&sku, epoch, position);
            let script = match used {
                true => &store.tickets.used,
                false => &store.tickets.release,
            };
            let mut invocation = script.key(&claim);
            invocation.arg(key.as_str());
            if !used {
                invocation.arg(&nonce);
            }
            if let Err(error) = store.run::<i64>(&claim, &invocation).await {
                tracing::warn!(%error, %sku, position, used, "could not end a ticket's claim; it stays as it is until the ticket expires");
            }
        });
    }
}
