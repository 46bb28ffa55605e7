//! Several nodes' count of each customer's units of a product with `max_per_customer`
//! (`cluster::limits`): one hash per (customer, SKU), `<prefix>limit:<customer>/<sku>`, a field
//! per order that counts (`<units>:<nonce>`), expiring `--order-retention` after its last change.
//! A customer's hashes share a Redis Cluster slot (the customer's hash tag), so one script checks
//! and takes every limited line of a checkout at once.

use super::*;
use crate::domain::{CustomerId, OrderId};

/// What taking a checkout's units found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowanceTaken {
    /// Taken now, under this try's nonce.
    Taken,
    /// The order is durable and counted already (a retry of a checkout that placed it).
    Present,
    /// This SKU would go past its limit: nothing taken.
    Over(Sku),
}

/// Checks and takes a checkout's units of its limited SKUs, all or none. KEYS = one hash per
/// limited SKU; ARGV[1] = the order id (the field), ARGV[2] = the value's nonce, ARGV[3] = the
/// hashes' TTL in ms, ARGV[4] = how long the take is provisional (ms), then per key its units and
/// its limit. Times are Redis's clock (`TIME`), so the nodes' clocks need not agree.
///
/// A field is `<units>:<nonce>` once its order is durable (confirmed by `ADD`), or
/// `<units>:<nonce>:<until ms>` while its checkout runs: a provisional one past its time (its
/// checkout died, or never recorded its order) counts no more and is removed here. The order's
/// own provisional field (an earlier try of the same checkout) is replaced: this try owns the
/// units and their give-back, and the earlier try's compare-and-delete misses. Returns 0
/// (taken), -1 (the order is durable and counted already), or the index (from 1) of the first SKU
/// that would go past its limit.
const TAKE: &str = r"
local order, ttl = ARGV[1], ARGV[3]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local mine = redis.call('HGET', KEYS[1], order)
if mine and not string.match(mine, '^%d+:[^:]*:%d+$') then return -1 end
for i = 1, #KEYS do
  local units, limit = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  local sum = 0
  local fields = redis.call('HGETALL', KEYS[i])
  for f = 1, #fields, 2 do
    local value = fields[f + 1]
    local until_ms = tonumber(string.match(value, '^%d+:[^:]*:(%d+)$'))
    if until_ms and until_ms < now then
      redis.call('HDEL', KEYS[i], fields[f])
    elseif fields[f] ~= order then
      sum = sum + (tonumber(string.match(value, '^(%d+)')) or 0)
    end
  end
  if sum + units > limit then return i end
end
local until_ms = string.format('%d', now + tonumber(ARGV[4]))
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i], order, ARGV[3 + 2 * i] .. ':' .. ARGV[2] .. ':' .. until_ms)
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return 0
";

/// Gives back what one checkout took, if still its own. KEYS = its hashes; ARGV[1] = the order
/// id, ARGV[2] = its nonce.
const RELEASE: &str = r"
for i = 1, #KEYS do
  local there = redis.call('HGET', KEYS[i], ARGV[1])
  if there and string.match(there, '^%d+:([^:]*)') == ARGV[2] then redis.call('HDEL', KEYS[i], ARGV[1]) end
end
return 1
";

/// Confirms orders that count (durable: placed, adopted, or known at a rebuild): a field absent
/// is added, a provisional one made final. KEYS = hashes; ARGV[1] = the TTL in ms, then per key
/// the order id and its units.
const ADD: &str = r"
for i = 1, #KEYS do
  local order = ARGV[2 * i]
  local there = redis.call('HGET', KEYS[i], order)
  if not there then
    redis.call('HSET', KEYS[i], order, ARGV[1 + 2 * i] .. ':known')
  else
    local final = string.match(there, '^(%d+:[^:]*):%d+$')
    if final then redis.call('HSET', KEYS[i], order, final) end
  end
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return 1
";

pub(super) struct AllowanceScripts {
    take: Script,
    release: Script,
    add: Script,
}

impl AllowanceScripts {
    pub(super) fn new() -> Self {
        Self {
            take: Script::new(TAKE),
            release: Script::new(RELEASE),
            add: Script::new(ADD),
        }
    }
}

impl RedisStore {
    fn allowance_key(&self, customer: &CustomerId, sku: &Sku) -> String {
        // Ids have no '/': no two (customer, SKU) pairs share a key.
        format!("{}/{}", self.key("limit", customer.as_str()), sku.as_str())
    }

    /// Takes `units` (SKU, units, limit) of `customer` for `order`, all or none, provisionally
    /// for `provisional_ms` (until [`Self::add_allowances`] confirms the order).
    pub async fn take_allowance(
        &self,
        customer: &CustomerId,
        order: &OrderId,
        nonce: &str,
        units: &[(Sku, i64, u32)],
        ttl_ms: i64,
        provisional_ms: i64,
    ) -> Result<AllowanceTaken, StoreError> {
        let Some((first, ..)) = units.first() else {
            return Ok(AllowanceTaken::Present);
        };
        let subject = self.allowance_key(customer, first);
        let mut invocation = self.allowances.take.prepare_invoke();
        invocation
            .arg(order.as_str())
            .arg(nonce)
            .arg(ttl_ms.max(1))
            .arg(provisional_ms.max(1));
        for (sku, count, limit) in units {
            invocation
                .key(self.allowance_key(customer, sku))
                .arg(*count)
                .arg(*limit);
        }
        let found: i64 = self.run(&subject, &invocation).await?;
        Ok(match found {
            0 => AllowanceTaken::Taken,
            -1 => AllowanceTaken::Present,
            n => match usize::try_from(n - 1).ok().and_then(|i| units.get(i)) {
                Some((sku, ..)) => AllowanceTaken::Over(sku.clone()),
                None => {
                    return Err(StoreError::Unexpected {
                        key: subject,
                        what: format!("the count of customers' units answered {n}"),
                    })
                }
            },
        })
    }

    /// Gives back what [`Self::take_allowance`] took for `order` with `nonce`, if still its own.
    pub async fn release_allowance(
        &self,
        customer: &CustomerId,
        order: &OrderId,
        nonce: &str,
        skus: &[Sku],
    ) -> Result<(), StoreError> {
        let Some(first) = skus.first() else {
            return Ok(());
        };
        let subject = self.allowance_key(customer, first);
        let mut invocation = self.allowances.release.prepare_invoke();
        invocation.arg(order.as_str()).arg(nonce);
        for sku in skus {
            invocation.key(self.allowance_key(customer, sku));
        }
        self.run::<i64>(&subject, &invocation).await.map(|_| ())
    }

    /// Forgets orders whose units count no more (released, refunded, past retention): each
    /// (customer, order, its SKUs).
    pub async fn forget_allowances(
        &self,
        gone: &[(CustomerId, OrderId, Vec<Sku>)],
    ) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for (customer, order, skus) in gone {
            for sku in skus {
                pipe.cmd("HDEL")
                    .arg(self.allowance_key(customer, sku))
                    .arg(order.as_str())
                    .ignore();
            }
        }
        self.run::<()>("the count of customers' units", &pipe).await
    }

    /// Whether this node's mark in the count is gone (first use, or Redis lost its keys): the
    /// mark is set again, for `ttl_ms`, and the node must add the orders it knows count.
    pub async fn allowances_mark_was_gone(&self, ttl_ms: i64) -> Result<bool, StoreError> {
        let mark = self.key("limit-node", &self.node);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&mark)
            .arg("1")
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1));
        let (set,): (Option<String>,) = self.run(&mark, &pipe).await?;
        Ok(set.is_some())
    }

    /// Confirms orders that count (customer, order, units per limited SKU): added where absent,
    /// made final where provisional.
    pub async fn add_allowances(
        &self,
        orders: &[crate::engine::CountingOrder],
        ttl_ms: i64,
    ) -> Result<(), StoreError> {
        // One script per customer (its keys share a slot on a Redis Cluster).
        for (customer, order, units) in orders {
            let Some((first, _)) = units.first() else {
                continue;
            };
            let subject = self.allowance_key(customer, first);
            let mut invocation = self.allowances.add.prepare_invoke();
            invocation.arg(ttl_ms.max(1));
            for (sku, count) in units {
                invocation
                    .key(self.allowance_key(customer, sku))
                    .arg(order.as_str())
                    .arg(*count);
            }
            self.run::<i64>(&subject, &invocation).await?;
        }
        Ok(())
    }
}
