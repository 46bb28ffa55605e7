//! The Lua scripts (one per operation: atomic, one round trip) and the encodings of what they
//! store: a finished answer, a cart's lines.

use super::*;

pub(super) struct Scripts {
    pub(super) cart_create: Script,
    pub(super) cart_get: Script,
    pub(super) cart_set: Script,
    pub(super) cart_clear: Script,
    pub(super) begin: Script,
    pub(super) steps: Script,
    pub(super) renew: Script,
}

/// `refresh`: a cart's expiry renewed in the hash and in the set of live carts. `lines`: a cart's
/// lines packed in one string (`s:<sku> <position>:<quantity>` per line, `\n` between): one bulk
/// string is far cheaper to send and parse than the hash's fields, and the sorting by position is
/// left to the node (Redis's CPU is the one every node shares).
pub(super) const REFRESH: &str = r"
local function lines(cart)
  local fields = redis.call('HGETALL', cart)
  local out = {}
  for i = 1, #fields, 2 do
    if string.byte(fields[i], 1) == 115 then out[#out + 1] = fields[i] .. ' ' .. fields[i + 1] end
  end
  return table.concat(out, '\n')
end
local function refresh(carts, cart, now, ttl, id)
  redis.call('PEXPIRE', cart, ttl)
  redis.call('ZADD', carts, now + ttl, id)
  local left = redis.call('PTTL', carts)
  if left < ttl then redis.call('PEXPIRE', carts, ttl) end
end
";

pub(super) const CART_CREATE: &str = r"
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return {'full'} end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'n', 0)
refresh(KEYS[1], KEYS[2], now, ttl, ARGV[3])
return {'ok'}
";

pub(super) const CART_GET: &str = r"
if redis.call('EXISTS', KEYS[2]) == 0 then return {'none'} end
refresh(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])
return {'ok', lines(KEYS[2])}
";

/// ARGV[4] = sku, ARGV[5] = quantity (0 removes), ARGV[6] = lines at most.
pub(super) const CART_SET: &str = r"
if redis.call('EXISTS', KEYS[2]) == 0 then return {'none'} end
local field, quantity = 's:' .. ARGV[4], tonumber(ARGV[5])
local old = redis.call('HGET', KEYS[2], field)
if quantity == 0 then
  if old then redis.call('HDEL', KEYS[2], field) end
elseif old then
  local position = string.match(old, '^(%d+):')
  redis.call('HSET', KEYS[2], field, position .. ':' .. ARGV[5])
else
  if redis.call('HLEN', KEYS[2]) - 1 >= tonumber(ARGV[6]) then return {'too_many'} end
  local position = redis.call('HINCRBY', KEYS[2], 'n', 1)
  redis.call('HSET', KEYS[2], field, position .. ':' .. ARGV[5])
end
refresh(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])
return {'ok', lines(KEYS[2])}
";

/// Empties a cart, keeping its expiry. KEYS[1] = cart.
pub(super) const CART_CLEAR: &str = r"
local left = redis.call('PTTL', KEYS[1])
if left <= 0 then return 0 end
local next = redis.call('HGET', KEYS[1], 'n') or 0
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'n', next)
redis.call('PEXPIRE', KEYS[1], left)
return 1
";

/// A checkout's start with a cart (without one, starts go batched: STEPS). KEYS[1] = the key's
/// (its lock, or its answer), KEYS[2] = carts, KEYS[3] = cart; ARGV[1] = lock value, ARGV[2] =
/// lock ttl ms, ARGV[3] = now ms, ARGV[4] = cart ttl ms, ARGV[5] = cart id.
///
/// A lock Turnstile wrote is a string starting with `~` with a TTL; a lock value without expiry
/// would make the key answer `409` for ever, so it is `junk`: the checkout fails naming the key,
/// as a value of another type under the key does (`junk_answer`).
pub(super) const BEGIN: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local there = redis.pcall('GET', KEYS[1])
  if type(there) == 'table' then return {'junk_answer', tostring(there.err)} end
  if there then
    if string.byte(there, 1) ~= 126 then return {'answer', there} end
    if redis.call('PTTL', KEYS[1]) < 0 then return {'junk'} end
    if there ~= ARGV[1] then return {'held'} end
  end
end
if redis.call('EXISTS', KEYS[3]) == 0 then return {'locked', 'none'} end
refresh(KEYS[2], KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
return {'locked', 'cart', lines(KEYS[3])}
";

/// Checkouts' ends, many in one call: the finisher's (an end a core's batch could not carry, a
/// refusal's or a failure's lock release, the answers a restarted node sends again: late ends,
/// which may meet another node's lock or answer). A core's batch of starts and ends goes as plain
/// commands instead ([`super::starts`]). KEYS = one per end, the key's (`<p>key:<idempotency
/// key>`: its lock while a checkout runs, then its answer); ARGV[1] = unused (the lock TTL), then
/// per end three: `e` and its lock value, the answer it stores, and that answer's TTL in ms (`0`:
/// none to store). Returns one string with a code per end, in order (as [`STEP_CODES`] names
/// them).
///
/// The answer replaces the lock if the lock is still that checkout's (or is gone), then `D`; an
/// end without an answer deletes the lock if still its own. `T` (a twin) when the key is taken by
/// another (another answer there, another checkout's lock, or a value of another type put over
/// this checkout's lock, which another node may start the key past): this node's answer could
/// not reach Redis while its lock lived, and another node placed the key or is placing it, so the
/// key has (or is about to have) an order on each of two nodes, which the node reports; nothing
/// is replaced (the answer another node's clients already replay stays). A lock is "ours" when
/// its value starts with the one given: lock values start with `~` and end with `/`, so a
/// checkout's own value matches only itself, and the node's prefix (`~<node>/`, given by the
/// start-up recovery) matches every lock of the node's earlier runs.
///
/// Every read is a `pcall`, so junk under one key fails only its own step; every end may run
/// twice (a batch whose answer was lost is sent again: an end finds its own answer there).
pub(super) const STEPS: &str = r"
local function finish(key, value, stored, ttl)
  local there = redis.pcall('GET', key)
  if type(there) == 'table' then return 'T' end
  local ours = there ~= false and string.sub(there, 1, #value) == value
  if ttl ~= '0' then
    if ours or there == false then
      redis.call('SET', key, stored, 'PX', ttl)
      return 'D'
    end
    if there == stored then return 'D' end
    return 'T'
  end
  if ours then redis.call('DEL', key) end
  return 'D'
end
local codes, at = {}, 2
for i = 1, #KEYS do
  codes[i] = finish(KEYS[i], string.sub(ARGV[at], 2), ARGV[at + 1], ARGV[at + 2])
  at = at + 3
end
return {table.concat(codes)}
";

/// What each code of a `STEPS` reply says, and whether a payload comes with it (none does).
pub(super) const STEP_CODES: [(u8, &str, bool); 2] = [(b'D', "done", false), (b'T', "twin", false)];

/// Renews the locks of checkouts whose outcome is not known yet. KEYS = their locks; ARGV[1] = the
/// TTL in ms, ARGV[1 + i] = the value of lock i. A lock still holding its checkout's value gets a
/// new TTL; one that does not (gone, or another checkout's) is not taken back, since its
/// checkout may have ended meanwhile: its index is returned, for the node to say it lost it.
pub(super) const RENEW: &str = r"
local lost = {}
for i = 1, #KEYS do
  if redis.pcall('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
";

impl Scripts {
    pub(super) fn new() -> Self {
        let with_refresh = |body: &str| Script::new(&format!("{REFRESH}{body}"));
        Self {
            cart_create: with_refresh(CART_CREATE),
            cart_get: with_refresh(CART_GET),
            cart_set: with_refresh(CART_SET),
            cart_clear: Script::new(CART_CLEAR),
            begin: with_refresh(BEGIN),
            steps: Script::new(STEPS),
            renew: Script::new(RENEW),
        }
    }
}

/// `<status> <at_ms> <fingerprint>\n<body>`: the answer as Redis keeps it.
pub fn encode_answer(answer: &StoredAnswer) -> String {
    format!(
        "{} {} {}\n{}",
        answer.status, answer.at_ms, answer.fingerprint, answer.body
    )
}

/// The answer [`encode_answer`] wrote, or what is wrong with the bytes.
pub fn decode_answer(raw: &str) -> Result<StoredAnswer, String> {
    let (head, body) = raw.split_once('\n').ok_or("no header line")?;
    let mut parts = head.split(' ');
    let (Some(status), Some(at_ms), Some(fingerprint), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "header {head:?} is not `<status> <at_ms> <fingerprint>`"
        ));
    };
    let status: u16 = status
        .parse()
        .ok()
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("status {status:?}"))?;
    let at_ms: i64 = at_ms.parse().map_err(|_| format!("time {at_ms:?}"))?;
    if fingerprint.is_empty() {
        return Err("empty fingerprint".into());
    }
    Ok(StoredAnswer {
        fingerprint: fingerprint.to_owned(),
        status,
        body: body.to_owned(),
        at_ms,
    })
}

/// Whether Redis answered with an error about what it holds (rather than about being unavailable
/// now: loading, busy, out of memory, read-only, failing over).
pub(super) fn is_unexpected(error: &redis::RedisError) -> bool {
    use redis::ErrorKind;
    match error.kind() {
        ErrorKind::TypeError | ErrorKind::ResponseError => true,
        ErrorKind::ExtensionError => error.code() == Some("WRONGTYPE"),
        _ => false,
    }
}

/// A cart's lines as the scripts pack them (`s:<sku> <position>:<quantity>` per line, in the
/// hash's order), in the order they were first added.
pub(super) fn parse_lines(
    key: &str,
    packed: Option<&String>,
) -> Result<Vec<(Sku, i64)>, StoreError> {
    let packed = packed.map_or("", String::as_str);
    let mut lines = packed
        .split('\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            line.strip_prefix("s:")
                .and_then(|line| line.split_once(' '))
                .and_then(|(sku, value)| {
                    let (position, quantity) = value.split_once(':')?;
                    Some((
                        position.parse::<u64>().ok()?,
                        Sku::parse(sku).ok()?,
                        quantity.parse::<i64>().ok()?,
                    ))
                })
                .ok_or_else(|| StoreError::Unexpected {
                    key: key.to_owned(),
                    what: format!("cart line {line:?}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    lines.sort_unstable_by_key(|(position, ..)| *position);
    Ok(lines.into_iter().map(|(_, sku, q)| (sku, q)).collect())
}
