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

/// A checkout's start with a cart (without one, starts go batched: STEPS). KEYS[1] = answer,
/// KEYS[2] = lock, KEYS[3] = carts, KEYS[4] = cart; ARGV[1] = lock value, ARGV[2] = lock ttl ms,
/// ARGV[3] = now ms, ARGV[4] = cart ttl ms, ARGV[5] = cart id.
///
/// A lock Turnstile wrote is a string with a TTL; anything else under the lock's key (another
/// type, a value without expiry) would make the key answer `409` for ever, so it is `junk`: the
/// checkout fails naming the key, as junk under an answer key does.
pub(super) const BEGIN: &str = r"
local answer = redis.call('GET', KEYS[1])
if answer then return {'answer', answer} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local held = redis.pcall('GET', KEYS[2])
  if type(held) ~= 'string' or redis.call('PTTL', KEYS[2]) < 0 then return {'junk'} end
  if held ~= ARGV[1] then return {'held'} end
end
if redis.call('EXISTS', KEYS[4]) == 0 then return {'locked', 'none'} end
refresh(KEYS[3], KEYS[4], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
return {'locked', 'cart', lines(KEYS[4])}
";

/// Checkouts' starts and ends, many in one call ([`super::starts`], and the finisher's ends). KEYS
/// = answer, lock, answer, lock, ...; ARGV[1] = the lock TTL in ms, then per step: a start, one
/// argument, `s` and its lock value (`s` alone: a look, which takes nothing); an end, three, `e`
/// and its lock value, the answer it stores, and that answer's TTL in ms (`0`: none to store).
/// Returns one string with a code per step, in order, then the payload of each step that has one
/// (an answer found, a junk answer's error), in order: the few bytes each side parses per step
/// are what a checkout costs Redis and the node beyond the commands themselves.
///
/// A start (codes as [`STEP_CODES`] names them): `A` and the answer any node stored; `L` (the
/// lock taken, or already this start's: a start may run twice); `F` (a look, nothing held); `H`
/// (another checkout holds the lock); `J` (a value under the lock Turnstile did not write, see
/// BEGIN); `j` and the error (the answer's key holds another type).
///
/// An end: the answer stored (if any), then the lock released if still that checkout's; `D`,
/// or `T` (a twin) when the answer finds the key taken by another (another answer there, or
/// another checkout holding the lock while none is): this node's answer could not reach Redis
/// while its lock lived, and another node placed the key or is placing it, so the key has (or is
/// about to have) an order on each of two nodes, which the node reports. The answer is stored
/// only if none is there yet and no other checkout holds the lock (one that went on without the
/// lock, Redis being unreachable, or whose lock expired, must not replace the answer another
/// node's clients already replay). A lock is "ours" when its value starts with the one given:
/// lock values end with `/`, so a checkout's own value matches only itself, and the node's
/// prefix (`<node>/`, given by the start-up recovery) matches every lock of the node's earlier
/// runs.
///
/// Every read is a `pcall`, so junk under one key fails only its own step; every step may run
/// twice (a batch whose answer was lost is sent again).
pub(super) const STEPS: &str = r"
local payloads = {}
local function start(answer_key, lock_key, value)
  local answer = redis.pcall('GET', answer_key)
  if type(answer) == 'table' then
    payloads[#payloads + 1] = tostring(answer.err)
    return 'j'
  end
  if answer then
    payloads[#payloads + 1] = answer
    return 'A'
  end
  if value ~= '' and redis.call('SET', lock_key, value, 'NX', 'PX', ARGV[1]) then return 'L' end
  local held = redis.pcall('GET', lock_key)
  if held == false then return 'F' end
  if type(held) ~= 'string' or redis.call('PTTL', lock_key) < 0 then return 'J' end
  if held == value then return 'L' end
  return 'H'
end
local function finish(answer_key, lock_key, value, stored, ttl)
  local lock = redis.pcall('GET', lock_key)
  local ours = type(lock) == 'string' and string.sub(lock, 1, #value) == value
  local twin = false
  if ttl > 0 then
    local stored_now = (ours or lock == false)
      and redis.call('SET', answer_key, stored, 'NX', 'PX', ttl)
    if not stored_now then
      local there = redis.pcall('GET', answer_key)
      twin = there == false or (type(there) == 'string' and there ~= stored)
    end
  end
  if ours then redis.call('DEL', lock_key) end
  if twin then return 'T' end
  return 'D'
end
local codes, at = {}, 2
for i = 1, #KEYS / 2 do
  local step = ARGV[at]
  if string.byte(step, 1) == 101 then
    codes[i] = finish(KEYS[2 * i - 1], KEYS[2 * i], string.sub(step, 2), ARGV[at + 1],
      tonumber(ARGV[at + 2]))
    at = at + 3
  else
    codes[i] = start(KEYS[2 * i - 1], KEYS[2 * i], string.sub(step, 2))
    at = at + 1
  end
end
local out = {table.concat(codes)}
for i = 1, #payloads do out[i + 1] = payloads[i] end
return out
";

/// What each code of a `STEPS` reply says, by the names [`super::RedisStore::read_begin`] reads
/// (shared with BEGIN's tags), and whether a payload comes with it.
pub(super) const STEP_CODES: [(u8, &str, bool); 8] = [
    (b'A', "answer", true),
    (b'j', "junk_answer", true),
    (b'L', "locked", false),
    (b'F', "free", false),
    (b'H', "held", false),
    (b'J', "junk", false),
    (b'D', "done", false),
    (b'T', "twin", false),
];

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
