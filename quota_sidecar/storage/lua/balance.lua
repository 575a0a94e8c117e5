-- The account view behind GetBalance and GetAccount: plan, zone, free use
-- of each product's current window, live lots, holds, every lot, totals,
-- spend cap and this month's spend. Applies lazy expiry first so what it
-- shows is spendable. Times are in milliseconds; credits are integers.
local default_plan = next_arg()
local expected_tz  = next_arg()
local days         = next_block(3)
local weeks        = next_block(3)
local months       = next_block(3)
-- {product, plan, max_concurrent, limits JSON}: every product under every plan
local product_rows = next_block(4)

local plan, tz = account(default_plan)
if tz ~= expected_tz then return fail('TZ_MISMATCH', {tz = tz, plan = plan}) end
local label, window_end_ms = pick_window(days)
local week_label, week_end_ms = pick_window(weeks)
local month, month_end_ms = pick_window(months)
if label == nil or week_label == nil or month == nil then return fail('CLOCK_SKEW', {now_ms = now_ms}) end

sweep()

-- Per product of the account's plan (or its override): every limit's state.
local free = {}
for _, row in ipairs(product_rows) do
  if row[2] == plan then
    local product = row[1]
    local limits, max_concurrent, overridden = cjson.decode(row[4]), tonumber(row[3]), 0
    local override = redis.call('HGET', K_ACCT, 'ovr|' .. product)
    if override then
      local o = cjson.decode(override)
      limits, max_concurrent, overridden = o.limits, o.max_concurrent, 1
    end
    local statuses = {}
    for i, limit in ipairs(limits) do
      local used, resets_ms = limit_state(product, limit, {label, window_end_ms}, {week_label, week_end_ms})
      statuses[i] = {limit.id, limit.kind, limit.hours, used, limit.free, resets_ms, limit.shadow}
    end
    free[#free + 1] = {product, statuses, tonumber(redis.call('HGET', K_INFLIGHT, product) or '0'),
                       max_concurrent, overridden}
  end
end

-- Every lot ever granted: {id, granted, left, expires_ms, granted_ms, source, revoked}.
local all = {}
local flat = redis.call('HGETALL', K_LOTS)
for i = 1, #flat, 2 do
  local meta = cjson.decode(flat[i + 1])
  local left = tonumber(redis.call('HGET', K_LOTREM, flat[i]) or '0')
  all[#all + 1] = {flat[i], meta.g, left, meta.e, meta.t, meta.src or 'purchase', meta.v or 0}
end

local lots, balance = live_lots()
-- The soonest-expiring holds only: an account may hold many (up to the open-holds
-- bound), and listing them all would make the reply grow without limit.
local HOLDS_LISTED = 100
local holds = {}
for _, rid in ipairs(redis.call('ZRANGE', K_HOLDS, 0, HOLDS_LISTED - 1)) do
  local rec = load_record(rid)
  if rec then holds[#holds + 1] = {rid, rec.p, rec.f, rec.c, rec.e} end
end

local overrides = {}
local fields = redis.call('HGETALL', K_ACCT)
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 4) == 'ovr|' then overrides[#overrides + 1] = {string.sub(fields[i], 5), fields[i + 1]} end
end

local v = redis.call('HMGET', K_ACCT, 'cap', 'at_on', 'at_thr', 'at_pack')
return reply({plan = plan, tz = tz, now_ms = now_ms, resets_ms = window_end_ms, free = free, overrides = overrides,
              lots = lots, all_lots = all, holds = holds, holds_total = redis.call('ZCARD', K_HOLDS),
              balance = balance, debt = tonumber(redis.call('HGET', K_ACCT, 'debt') or '0'),
              month = month, month_resets_ms = month_end_ms,
              month_spend = tonumber(redis.call('HGET', K_SPEND, month) or '0'),
              cap = tonumber(v[1] or '0'), at_on = v[2] or '0', at_thr = tonumber(v[3] or '0'),
              at_pack = v[4] or '', totals = totals_table()})
