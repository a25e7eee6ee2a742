-- `make bench-scale`: wrk requests spread over many keys of benches/e2e/scale.py's directory.
--
--   wrk -t1 -c32 -d5s -s benches/e2e/scale-keys.lua http://127.0.0.1:PORT/scale -- COUNT STRIDE KEYS
--
-- Request i (round robin over COUNT) carries the secret of key (i mod KEYS) of tenant
-- (i * STRIDE): with COUNT = 10000, STRIDE = 10 and KEYS = 10, 10,000 keys of 10,000 tenants
-- spread over a 100,000-tenant directory; with 2 1 1, the keys of tenants 0 and 1. The
-- requests are formatted once, in init, so each one costs wrk a table lookup. No `response`
-- function: wrk would parse every answer for it. Answers of 400 and above are in wrk's
-- "Non-2xx or 3xx responses" line.

local requests = {}
local n, i = 0, 0

-- The secret of key k of tenant t, as scale.py's `secret`: 40 characters.
local function secret(t, k)
  local s = string.format("tg_live_scale_%06d_%02d_", t, k)
  return s .. string.rep("x", 40 - #s)
end

function init(args)
  local count = tonumber(args[1]) or 1
  local stride = tonumber(args[2]) or 1
  local keys = tonumber(args[3]) or 1
  for j = 0, count - 1 do
    requests[j + 1] = wrk.format("GET", "/scale", { ["Authorization"] = "Bearer " .. secret(j * stride, j % keys) })
  end
  n = count
end

function request()
  i = i % n + 1
  return requests[i]
end
