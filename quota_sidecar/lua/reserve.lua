-- CheckAndReserve: the whole decision in one atomic step.
--
-- Order: replay of a known reservation_id; time-zone agreement; lazy expiry
-- of this account's lots and holds; entitlement; one free unit of the
-- current window; else the full cost in credits, soonest-expiring lots
-- first; else a denial. A job is funded wholly by one or the other.
-- Denials are not recorded: they hold nothing, so a retry re-decides.
--
-- Times are in milliseconds; credits are integers.
local pinned_ms      = tonumber(ARGV[1])
local rid            = ARGV[2]
local product        = ARGV[3]
local fingerprint    = ARGV[4]
local ttl_ms         = tonumber(ARGV[5])
local cost_credits   = tonumber(ARGV[6])
local retention_ms   = tonumber(ARGV[7])
local default_plan   = ARGV[8]
local expected_tz    = ARGV[9]
local WINDOWS_AT     = 10  -- count, then (label, start_ms, end_ms) triples
local plans_at       = WINDOWS_AT + 1 + 3 * tonumber(ARGV[WINDOWS_AT])
-- ARGV[plans_at] = count, then (plan, free_limit, entitled 0|1) triples

local now_ms = clock_ms(pinned_ms)

local existing = load_record(rid)
if existing then
  if existing.fp ~= fingerprint then return fail('RESERVATION_PARAMS_MISMATCH') end
  local d = existing.d
  d.replayed = 1
  return reply(d)
end

local plan, tz = account(default_plan)
-- The sidecar computed windows for the zone it believed; it retries with ours.
if tz ~= expected_tz then return fail('TZ_MISMATCH', {tz = tz, plan = plan}) end

local function plan_row(name)
  local n = tonumber(ARGV[plans_at])
  for i = 0, n - 1 do
    local base = plans_at + 1 + 3 * i
    if ARGV[base] == name then return tonumber(ARGV[base + 1]), ARGV[base + 2] == '1' end
  end
  return nil, nil
end

local free_limit, entitled = plan_row(plan)
if free_limit == nil then return fail('UNKNOWN_PLAN', {plan = plan}) end
local label, window_end_ms = pick_window(WINDOWS_AT, now_ms)
if label == nil then return fail('CLOCK_SKEW', {now_ms = now_ms}) end

sweep(now_ms, retention_ms)

local free_field = product .. '|' .. label
local free_used = tonumber(redis.call('HGET', K_FREE, free_field) or '0')
local lots, balance = live_lots(now_ms)
local decision = {
  allowed = 0, plan = plan, tz = tz, cost = cost_credits, free_used = free_used,
  free_limit = free_limit, resets_ms = window_end_ms, balance = balance,
  held = 0, expires_ms = 0, now_ms = now_ms, replayed = 0,
}

if not entitled then
  decision.denial = 'NOT_ENTITLED'
  return reply(decision)
end

local rec = {
  s = 'held', p = product, fp = fingerprint, c = 0, l = {}, ff = '',
  cr = now_ms, e = now_ms + ttl_ms, ttl = ttl_ms,
}

if free_used < free_limit then
  -- First unit of a new window: a good moment to drop windows long gone.
  if free_used == 0 then prune_free_windows(ARGV[WINDOWS_AT + 1]) end
  redis.call('HINCRBY', K_FREE, free_field, 1)
  rec.f, rec.ff = 'free', free_field
  decision.free_used = free_used + 1
elseif balance >= cost_credits then
  local need = cost_credits
  for i = 1, #lots, 3 do
    if need == 0 then break end
    local lot_id, left = lots[i], lots[i + 1]
    local take = math.min(left, need)
    if take > 0 then
      redis.call('HINCRBY', K_LOTREM, lot_id, -take)
      if take == left then redis.call('ZREM', K_LOTEXP, lot_id) end
      local taken = rec.l
      taken[#taken + 1] = lot_id
      taken[#taken + 1] = take
      taken[#taken + 1] = lots[i + 2]
      need = need - take
    end
  end
  rec.f, rec.c = 'credits', cost_credits
  decision.held = cost_credits
  decision.balance = balance - cost_credits
else
  decision.denial = 'PURCHASE_REQUIRED'
  decision.short = cost_credits - balance
  return reply(decision)
end

decision.allowed = 1
decision.funding = rec.f
decision.expires_ms = rec.e
rec.d = decision
save_record(rid, rec)
redis.call('ZADD', K_HOLDS, rec.e, rid)
return reply(decision)
