-- Commit: a hold becomes spend, optionally at a lower actual cost; the rest
-- goes back to the lots it came from (latest-expiring first, so the credits
-- that expire soonest are the ones spent).
--
-- Each reservation resolves once: a repeated Commit with the same outcome
-- replays it; a Commit after Release or expiry is refused.
--
-- Actual params, when given, must describe a job the hold covers: one the
-- account's plan (at reservation time) is entitled to, costing no more than
-- what was held (credits) or than the job reserved (a free unit covers one
-- job of up to the reserved size, not a larger one).
--
-- A metered job funded by included usage (rec.fu, the estimate its windows counted): the
-- actual usage is charged where the hold was, each window's use adjusted from the estimate to
-- the actual (adjust_free_units); above the estimate the overage policy decides: reject
-- (COST_EXCEEDS_HOLD), cap (the windows keep the estimate, the excess written off) or draw (the
-- windows take it all, even past their allowance: usage is no debt). The entry's df is the
-- difference.
-- Times are in milliseconds; credits are integers.
local rid   = next_arg()
-- {plans version or '*', product, actual_cost, entitled plans as "|a|b|", overage,
-- debt bounds as "|plan:credits|..."}: cost -1 (or no row) charges the whole hold; -2:
-- params invalid for the product. overage: the product's policy for a cost above the
-- hold: 0 reject (COST_EXCEEDS_HOLD); 1 cap (the hold is charged, the excess written off
-- and recorded as wo in the commit's entry); 2 draw (the hold is charged, the excess
-- drawn from the live lots, soonest expiry first; what they cannot cover becomes the
-- account's debt, up to the plan's bound (max_debt_credits); the rest is written off).
local costs = next_block(6)

-- The excess past a hold under overage draw: from the live lots (soonest expiry first, as a
-- hold takes them), then debt up to the plan's bound (a commit never raises the debt past
-- max(debt before, bound)), the rest written off. The drawn credits and the debt count in the
-- hold's month spend, but the spend cap never refuses a commit: the job already ran. The
-- record keeps the outcome (a retry replays it).
local function draw_overage(rec, excess, debt_before, bound)
  local lots, available = live_lots()
  local taken, drawn = take_from_lots(lots, math.min(excess, available))
  local debt = math.max(0, math.min(excess - drawn, bound - debt_before))
  local wo = excess - drawn - debt
  if drawn + debt > 0 then redis.call('HINCRBY', K_SPEND, rec.m, drawn + debt) end
  rec.rq, rec.dw, rec.db, rec.wo = rec.c + excess, drawn, debt, wo
  return {drawn = drawn, debt = debt, wo = wo, taken = taken}
end

local rec = load_record(rid)
if not rec then return fail('RESERVATION_NOT_FOUND') end

-- Priced with the plans version the reservation was made under when the
-- sidecar still knows it ('*' rows: the current plans).
local actual, entitled_plans, priced_with, capped, drawing, bounds = -1, '', '', false, false, ''
for _, row in ipairs(costs) do
  if row[2] == rec.p and (row[1] == rec.pv or (row[1] == '*' and priced_with == '')) then
    actual, entitled_plans, priced_with, capped = tonumber(row[3]), row[4], row[1], row[5] == '1'
    drawing, bounds = row[5] == '2', row[6]
  end
end
-- Included usage under draw: the windows take the whole actual usage (nothing to hold it back).
local usage_drawn = drawing and rec.fu ~= nil
-- Bad input changes nothing, not even lazy expiry.
if actual == -2 then return fail('INVALID_PARAMS', {product = rec.p, pv = priced_with}) end
-- Overage cap: what the hold does not cover is written off (not a credit: no lot moves).
local written_off = 0
if capped and actual > rec.rc and rec.dg ~= 1 then
  written_off = actual - rec.rc
  actual = rec.rc
end
-- Overage draw (a credits hold): the hold is charged whole and the excess is settled past
-- it below, after lazy expiry, from what the lots hold then (the record keeps the cost asked
-- for as rq: what a retry must repeat, since the charge itself depends on the lots and the debt).
local excess, debt_before, debt_bound = 0, 0, 0
if drawing and actual > rec.rc and rec.dg ~= 1 and rec.f == 'credits' then
  excess = actual - rec.rc
  actual = rec.rc
  -- Everything the overage reads of the account, before the first write.
  debt_before = tonumber(redis.call('HGET', K_ACCT, 'debt') or '0')
  debt_bound = tonumber(string.match(bounds, '|' .. string.gsub(rec.pl or '', '%p', '%%%0') .. ':(%d+)|') or '0')
end

-- Cameo fees (rec.cf) are per use, not per second: any commit charges them whole, on top
-- of the actual generation cost (a free hold: the fees alone).
local fees = rec.cf or 0
local charge = rec.c
if rec.f == 'credits' and actual >= 0 then charge = actual + fees end
if rec.f == 'free' then charge = fees end

settle_if_due(rid, rec)
local result = {funding = rec.f, charged = charge, refunded = rec.c - charge,
                free_charged = (rec.f == 'free') and 1 or 0, replayed = 0, fees = fees,
                written_off = written_off}

if rec.s == 'committed' then
  if (rec.rq or rec.ch) ~= charge + excess then return fail('COMMIT_COST_MISMATCH', {charged = rec.ch}) end
  -- Included usage: the same actual usage replays (rec.fh: the estimate the hold counted).
  if rec.fh and rec.fu ~= (actual >= 0 and actual or rec.fh) then
    return fail('COMMIT_COST_MISMATCH', {charged = rec.ch})
  end
  sweep()  -- the balance reported is the one a GetBalance at this instant shows
  local _, balance = live_lots()
  result.replayed, result.balance, result.refunded = 1, balance, rec.rf
  result.usage = rec.fu
  if rec.rq then  -- an overage drawn: the outcome as it was, not as the lots would give it now
    result.charged, result.drawn, result.debt, result.written_off = rec.ch, rec.dw, rec.db, rec.wo
  end
  return reply(result)
end
local refusal = RESOLVED_REFUSALS[rec.s]
if refusal then return fail(refusal, {resolved_ms = rec.r}) end
-- Degraded records (dg) were allowed without a plan: nothing to check the actual job against.
if actual >= 0 and rec.dg ~= 1 then
  if not string.find(entitled_plans, '|' .. rec.pl .. '|', 1, true) then
    return fail('ACTUAL_NOT_ENTITLED', {plan = rec.pl})
  end
  if actual > rec.rc and not usage_drawn then
    return fail('COST_EXCEEDS_HOLD', {held = rec.c, reserved = rec.rc, actual = actual})
  end
end

sweep()
local over = nil
if excess > 0 then
  over = draw_overage(rec, excess, debt_before, debt_bound)
  written_off = over.wo
  result.charged, result.drawn, result.debt, result.written_off = charge + over.drawn + over.debt, over.drawn,
    over.debt, written_off
end
local extra = fees > 0 and {'fees', fees, 'roy', rec.cm} or {}
if over then
  for _, v in ipairs({'drawn', over.drawn, 'debt', over.debt, 'drawn_lots', lots_text(over.taken)}) do
    extra[#extra + 1] = v
  end
end
if written_off > 0 then
  extra[#extra + 1] = 'wo'
  extra[#extra + 1] = written_off
end
local free_delta = nil
if rec.fu then
  -- Included usage: no params charge the estimate; after cap, `actual` is at most the estimate.
  local held = rec.fu
  rec.fh = held
  adjust_free_units(rec, actual >= 0 and actual or held)
  free_delta = rec.fu - held
  for _, v in ipairs({'usage', rec.fu, 'usage_held', held, 'free_units', cjson.encode(rec.fw)}) do
    extra[#extra + 1] = v
  end
end
commit_hold(rid, rec, charge, extra, free_delta, over)
result.usage = rec.fu  -- included usage charged to the windows (nil for any other hold)

local _, balance = live_lots()
result.balance = balance
return reply(result)
