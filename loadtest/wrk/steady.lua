-- Successful single-item checkouts spread over 10,000 SKUs, paid with tok_ok. An optional script
-- argument is added to the keys' prefix.
-- Keys differ from one wrk process to the next (seed.lua).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "seed.lua")
local counter = 0
local prefix = tostring(math.random(1, 1000000000))
function setup(thread)
  thread:set("prefix", tostring(math.random(1, 1000000000)))
end
function init(args)
  prefix = prefix .. (args[1] or "")
end
request = function()
  counter = counter + 1
  local body = '{"items":[{"sku":"S' .. math.random(0, 9999) .. '","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}'
  return wrk.format("POST", "/v1/checkout",
    { ["Idempotency-Key"] = "st-" .. prefix .. "-" .. counter, ["Content-Type"] = "application/json" },
    body)
end
