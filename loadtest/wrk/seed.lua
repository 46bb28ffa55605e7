-- Seeds math.random from /dev/urandom (loaded by the scenario scripts beside it): wrk's own random
-- numbers repeat from process to process, and two runs against one server must not share keys
-- (the second would measure replays).
local f = io.open("/dev/urandom", "rb")
if f then
  local n = 0
  for _, b in ipairs({ f:read(4):byte(1, 4) }) do n = n * 256 + b end
  f:close()
  math.randomseed(n)
end
