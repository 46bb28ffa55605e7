-- Checkouts of one SKU (the first script argument: SOLDOUT for the flash-sale flood, HOT for
-- successful checkouts of a hot SKU), each with a new Idempotency-Key (the SKU is part of it, so
-- runs of the two never share keys), paid with tok_ok. An optional second argument is added to the
-- keys' prefix.
-- Keys differ from one wrk process to the next (seed.lua).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "seed.lua")
local counter = 0
local prefix = tostring(math.random(1, 1000000000))
local body
local sku
function setup(thread)
  thread:set("prefix", tostring(math.random(1, 1000000000)))
end
function init(args)
  sku = args[1] or "SOLDOUT"
  prefix = prefix .. (args[2] or "")
  body = '{"items":[{"sku":"' .. sku .. '","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}'
end
request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/checkout",
    { ["Idempotency-Key"] = sku .. "-" .. prefix .. "-" .. counter, ["Content-Type"] = "application/json" },
    body)
end
