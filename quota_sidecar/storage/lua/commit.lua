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
-- Times are in milliseconds; credits are integers.
local rid   = next_arg()
-- {plans version or '*', product, actual_cost, entitled plans as "|a|b|"}: cost
-- -1 (or no row) charges the whole hold; -2: params invalid for the product.
local costs = next_block(4)

local rec = load_record(rid)
if not rec then return fail('RESERVATION_NOT_FOUND') end

-- Priced with the plans version the reservation was made under when the
-- sidecar still knows it ('*' rows: the current plans).
local actual, entitled_plans, priced_with = -1, '', ''
for _, row in ipairs(costs) do
  if row[2] == rec.p and (row[1] == rec.pv or (row[1] == '*' and priced_with == '')) then
    actual, entitled_plans, priced_with = tonumber(row[3]), row[4], row[1]
  end
end
-- Bad input changes nothing, not even lazy expiry.
if actual == -2 then return fail('INVALID_PARAMS', {product = rec.p, pv = priced_with}) end

-- Cameo fees (rec.cf) are per use, not per second: any commit charges them whole, on top
-- of the actual generation cost (a free hold: the fees alone).
local fees = rec.cf or 0
local charge = rec.c
if rec.f == 'credits' and actual >= 0 then charge = actual + fees end
if rec.f == 'free' then charge = fees end

settle_if_due(rid, rec)
local result = {funding = rec.f, charged = charge, refunded = rec.c - charge,
                free_charged = (rec.f == 'free') and 1 or 0, replayed = 0, fees = fees}

if rec.s == 'committed' then
  if rec.ch ~= charge then return fail('COMMIT_COST_MISMATCH', {charged = rec.ch}) end
  sweep()  -- the balance reported is the one a GetBalance at this instant shows
  local _, balance = live_lots()
  result.replayed, result.balance, result.refunded = 1, balance, rec.rf
  return reply(result)
end
local refusal = RESOLVED_REFUSALS[rec.s]
if refusal then return fail(refusal, {resolved_ms = rec.r}) end
-- Degraded records (dg) were allowed without a plan: nothing to check the actual job against.
if actual >= 0 and rec.dg ~= 1 then
  if not string.find(entitled_plans, '|' .. rec.pl .. '|', 1, true) then
    return fail('ACTUAL_NOT_ENTITLED', {plan = rec.pl})
  end
  if actual > rec.rc then return fail('COST_EXCEEDS_HOLD', {held = rec.c, reserved = rec.rc, actual = actual}) end
end

sweep()
commit_hold(rid, rec, charge, fees > 0 and {'fees', fees, 'roy', rec.cm} or {})

local _, balance = live_lots()
result.balance = balance
return reply(result)
