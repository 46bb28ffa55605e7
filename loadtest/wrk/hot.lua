-- Successful checkouts all on one hot SKU (large stock), paid with tok_ok.
local counter = 0
local prefix = tostring(math.random(1, 1000000000))
local body = '{"items":[{"sku":"HOT","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}'
function setup(thread)
  thread:set("prefix", tostring(math.random(1, 1000000000)))
end
request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/checkout",
    { ["Idempotency-Key"] = "hot-" .. prefix .. "-" .. counter, ["Content-Type"] = "application/json" },
    body)
end
