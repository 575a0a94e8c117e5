-- GetBalance: plan, zone, free use of each product's current window, live
-- lots and holds. Applies lazy expiry first so what it shows is spendable.
-- Times are in milliseconds; credits are integers.
local pinned_ms    = tonumber(ARGV[1])
local retention_ms = tonumber(ARGV[2])
local default_plan = ARGV[3]
local expected_tz  = ARGV[4]
local WINDOWS_AT   = 5  -- count, then (label, start_ms, end_ms) triples
local products_at  = WINDOWS_AT + 1 + 3 * tonumber(ARGV[WINDOWS_AT])
-- ARGV[products_at] = count, then product names

local now_ms = clock_ms(pinned_ms)
local plan, tz = account(default_plan)
if tz ~= expected_tz then return fail('TZ_MISMATCH', {tz = tz, plan = plan}) end
local label, window_end_ms = pick_window(WINDOWS_AT, now_ms)
if label == nil then return fail('CLOCK_SKEW', {now_ms = now_ms}) end

sweep(now_ms, retention_ms)

local free = {}
for i = 1, tonumber(ARGV[products_at]) do
  local product = ARGV[products_at + i]
  free[#free + 1] = product
  free[#free + 1] = tonumber(redis.call('HGET', K_FREE, product .. '|' .. label) or '0')
end

local lots, balance = live_lots(now_ms)
local granted = {}
for i = 1, #lots, 3 do
  local lot = cjson.decode(redis.call('HGET', K_LOTS, lots[i]))
  granted[#granted + 1] = lot.g
  granted[#granted + 1] = lot.t
end

local holds = {}
local rids = redis.call('ZRANGE', K_HOLDS, 0, -1)
for _, rid in ipairs(rids) do
  local rec = load_record(rid)
  if rec then
    holds[#holds + 1] = {rid, rec.p, rec.f, rec.c, rec.e}
  end
end

return reply({plan = plan, tz = tz, now_ms = now_ms, resets_ms = window_end_ms,
              free = free, lots = lots, granted = granted, holds = holds,
              balance = balance})
