-- The flash-sale flood: every request a new Idempotency-Key, all for a SKU with no stock left.
local counter = 0
local prefix = tostring(math.random(1, 1000000000))
local body = '{"items":[{"sku":"SOLDOUT","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}'
function setup(thread)
  thread:set("prefix", tostring(math.random(1, 1000000000)))
end
request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/checkout",
    { ["Idempotency-Key"] = "so-" .. prefix .. "-" .. counter, ["Content-Type"] = "application/json" },
    body)
end
