-- Cart operations on carts made beforehand (the first script argument: a file of cart ids, one per
-- line, written by setup_carts.py): in turn a line set (PUT /v1/carts/{id}/items/S<n>, n < 50, so
-- a cart stays under the 100-line cap) and a read (GET /v1/carts/{id}); one request in ten creates
-- a cart (POST /v1/carts). Every answer should be 2xx: wrk's "Non-2xx" line says otherwise.
local carts = {}
local counter = 0
function init(args)
  for line in io.lines(args[1]) do
    carts[#carts + 1] = line
  end
end
request = function()
  counter = counter + 1
  if counter % 10 == 0 then
    return wrk.format("POST", "/v1/carts")
  end
  local cart = carts[math.random(1, #carts)]
  if counter % 2 == 0 then
    return wrk.format("GET", "/v1/carts/" .. cart)
  end
  return wrk.format("PUT", "/v1/carts/" .. cart .. "/items/S" .. math.random(0, 49),
    { ["Content-Type"] = "application/json" },
    '{"quantity":' .. math.random(1, 3) .. '}')
end
