-- CheckAndReserve: the whole decision in one atomic step.
--
-- Order: replay of a known reservation_id; time-zone agreement; lazy expiry
-- of this account's lots and holds; entitlement; one free unit of the
-- current window; else the full cost in credits (within the monthly spend
-- cap), soonest-expiring lots first; else a denial. A job is funded wholly
-- by one or the other. Denials are not recorded: they hold nothing, so a
-- retry decides again.
--
-- The reservation record (res hash): s = state ("held", "committed",
-- "released", "expired"), p = product, fp = request fingerprint, f = funding
-- ("free" or "credits"), ff = free field, c = credits held, l = flat
-- {lot_id, credits, lot_expires_ms} triples the credits came from, m = spend
-- month, pv = plans version, cr = created_ms, e = expires_ms, ttl = ttl_ms,
-- ch = credits charged, rf = credits returned at commit, rj = credits given
-- back by RefundJob (set once), r = resolved_ms, d = the decision to replay.
--
-- Times are in milliseconds; credits are integers.
local rid           = next_arg()
local product       = next_arg()
local fingerprint   = next_arg()
local ttl_ms        = tonumber(next_arg())
local cost_credits  = tonumber(next_arg())
local default_plan  = next_arg()
local expected_tz   = next_arg()
local warn_percent  = tonumber(next_arg())
local days          = next_block(3)  -- {label, start_ms, end_ms}
local months        = next_block(3)
local plan_rows     = next_block(4)  -- {plan, free_limit, entitled 0|1, credits_low threshold}
local packs         = next_block(4)  -- {pack_id, credits, price minor units, currency}

local existing = load_record(rid)
if existing then
  if existing.fp ~= fingerprint then return fail('RESERVATION_PARAMS_MISMATCH') end
  existing.d.replayed = 1
  return reply(existing.d)
end

local plan, tz = account(default_plan)
-- The sidecar computed windows for the zone it believed; it retries with ours.
if tz ~= expected_tz then return fail('TZ_MISMATCH', {tz = tz, plan = plan}) end

local row = nil
for _, r in ipairs(plan_rows) do if r[1] == plan then row = r end end
if row == nil then return fail('UNKNOWN_PLAN', {plan = plan}) end
local free_limit, entitled, credits_low = tonumber(row[2]), row[3] == '1', tonumber(row[4])
local label, window_end_ms = pick_window(days)
local month = pick_window(months)
if label == nil or month == nil then return fail('CLOCK_SKEW', {now_ms = now_ms}) end

sweep()

local free_field = product .. '|' .. label
local free_used = tonumber(redis.call('HGET', K_FREE, free_field) or '0')
local lots, balance = live_lots()
local decision = {
  allowed = 0, plan = plan, tz = tz, cost = cost_credits, free_used = free_used,
  free_limit = free_limit, resets_ms = window_end_ms, balance = balance,
  held = 0, expires_ms = 0, now_ms = now_ms, replayed = 0,
}
if not entitled then
  decision.denial = 'NOT_ENTITLED'
  return reply(decision)
end

local function offers_json(short)
  local offers = {}
  for _, p in ipairs(packs) do
    local quantity = math.ceil(short / tonumber(p[2]))
    offers[#offers + 1] = {pack_id = p[1], credits = tonumber(p[2]), quantity = quantity,
                           total_minor = quantity * tonumber(p[3]), currency = p[4]}
  end
  return cjson.encode(offers)
end

local function deny(reason, event, fields)
  decision.denial = reason
  emit_once(event .. '|' .. product .. '|' .. label, event, fields)
  return reply(decision)
end

local rec = {s = 'held', p = product, fp = fingerprint, c = 0, l = {}, ff = '', m = '', pv = PLANS_VERSION,
             cr = now_ms, e = now_ms + ttl_ms, ttl = ttl_ms}

local function hold_free()
  if free_used == 0 then prune_old_windows(days[1][1], months[1][1]) end
  redis.call('HINCRBY', K_FREE, free_field, 1)
  rec.f, rec.ff = 'free', free_field
  decision.free_used = free_used + 1
  local scope = product .. '|' .. label
  local usage = {'product', product, 'window', label, 'used', free_used + 1, 'limit', free_limit}
  if (free_used + 1) * 100 >= warn_percent * free_limit then emit_once('free_warning|' .. scope, 'free_warning', usage) end
  if free_used + 1 == free_limit then emit_once('free_exhausted|' .. scope, 'free_exhausted', usage) end
end

-- Soonest expiry (then promo before purchase) first, as live_lots orders them.
local function hold_credits()
  local need = cost_credits
  for i = 1, #lots, 3 do
    if need == 0 then break end
    local lot_id, left = lots[i], lots[i + 1]
    local take = math.min(left, need)
    redis.call('HINCRBY', K_LOTREM, lot_id, -take)
    if take == left then redis.call('ZREM', K_LOTEXP, lot_id) end
    local taken = rec.l
    taken[#taken + 1] = lot_id
    taken[#taken + 1] = take
    taken[#taken + 1] = lots[i + 2]
    need = need - take
  end
  rec.f, rec.c, rec.m = 'credits', cost_credits, month
  redis.call('HINCRBY', K_SPEND, month, cost_credits)
  incr('credits_held', cost_credits)
  decision.held = cost_credits
  decision.balance = balance - cost_credits
end

local function after_balance_drop(new_balance)
  if credits_low > 0 and new_balance < credits_low then
    emit_once('credits_low', 'credits_low', {'balance', new_balance, 'threshold', credits_low, 'plan', plan})
  end
  local at = redis.call('HMGET', K_ACCT, 'at_on', 'at_thr', 'at_pack')
  if at[1] == '1' and new_balance < tonumber(at[2]) then
    emit_once('auto_topup', 'auto_topup_requested', {'balance', new_balance, 'threshold', at[2], 'pack_id', at[3]})
  end
end

if free_used < free_limit then
  hold_free()
elseif balance >= cost_credits then
  local cap = tonumber(redis.call('HGET', K_ACCT, 'cap') or '0')
  local month_spend = tonumber(redis.call('HGET', K_SPEND, month) or '0')
  if cap > 0 and month_spend + cost_credits > cap then
    decision.month_spend, decision.cap = month_spend, cap
    decision.denial = 'BUDGET_EXCEEDED'
    emit_once('budget_reached|' .. month, 'budget_reached', {'month', month, 'cap', cap, 'spend', month_spend})
    return reply(decision)
  end
  hold_credits()
  if cap > 0 and month_spend + cost_credits == cap then
    emit_once('budget_reached|' .. month, 'budget_reached', {'month', month, 'cap', cap, 'spend', cap})
  end
  after_balance_drop(decision.balance)
else
  decision.short = cost_credits - balance
  return deny('PURCHASE_REQUIRED', 'purchase_required',
              {'product', product, 'window', label, 'credits_short', decision.short, 'cost', cost_credits,
               'offers', offers_json(decision.short)})
end

decision.allowed = 1
decision.funding = rec.f
decision.expires_ms = rec.e
rec.d = decision
save_record(rid, rec)
redis.call('ZADD', K_HOLDS, rec.e, rid)
ledger('hold', hold_fields(rid, rec, {'credits', rec.c, 'free', rec.f == 'free' and 1 or 0, 'window', label,
                                      'used', decision.free_used, 'limit', free_limit, 'month', rec.m,
                                      'lots', lots_text(rec.l), 'cost', cost_credits}))
return reply(decision)
