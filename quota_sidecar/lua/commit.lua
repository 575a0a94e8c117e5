-- Commit: a hold becomes spend, optionally at a lower actual cost; the rest
-- goes back to the lots it came from (latest-expiring first, so the credits
-- that expire soonest are the ones spent).
--
-- Each reservation resolves once: a repeated Commit with the same outcome
-- replays it; a Commit after Release or expiry is refused.
-- Times are in milliseconds; credits are integers.
local rid   = next_arg()
local costs = next_block(3)  -- {plans version or '*', product, actual_cost}: -1 (or
                             -- no row) charges the whole hold; -2: params invalid

local rec = load_record(rid)
if not rec then return fail('RESERVATION_NOT_FOUND') end

-- Priced with the plans version the reservation was made under when the
-- sidecar still knows it ('*' rows: the current plans).
local actual, priced_with = -1, ''
for _, row in ipairs(costs) do
  if row[2] == rec.p and (row[1] == rec.pv or (row[1] == '*' and priced_with == '')) then
    actual, priced_with = tonumber(row[3]), row[1]
  end
end
-- Bad input changes nothing, not even lazy expiry.
if actual == -2 then return fail('INVALID_PARAMS', {product = rec.p, pv = priced_with}) end

local charge = rec.c
if rec.f == 'credits' and actual >= 0 then charge = actual end
if rec.f == 'free' then charge = 0 end

settle_if_due(rid, rec)
local result = {funding = rec.f, charged = charge, refunded = rec.c - charge,
                free_charged = (rec.f == 'free') and 1 or 0, replayed = 0}

if rec.s == 'committed' then
  if rec.ch ~= charge then return fail('COMMIT_COST_MISMATCH', {charged = rec.ch}) end
  sweep()  -- the balance reported is the one a GetBalance at this instant shows
  local _, balance = live_lots()
  result.replayed, result.balance, result.refunded = 1, balance, rec.rf
  return reply(result)
end
if rec.s == 'released' then return fail('ALREADY_RELEASED') end
if rec.s == 'expired' then return fail('EXPIRED', {expired_ms = rec.r}) end
if charge > rec.c then return fail('COST_EXCEEDS_HOLD', {held = rec.c, actual = charge}) end

sweep()

-- Give back the unused part from the lots taken last, which expire latest.
local refund = rec.c - charge
local back, kept = {}, {}
for i = #rec.l - 2, 1, -3 do
  local lot_id, credits, lot_expires_ms = rec.l[i], tonumber(rec.l[i + 1]), rec.l[i + 2]
  local give = math.min(credits, refund)
  if give > 0 then
    back[#back + 1] = lot_id
    back[#back + 1] = give
    back[#back + 1] = lot_expires_ms
    refund = refund - give
  end
  if credits - give > 0 then
    table.insert(kept, 1, lot_expires_ms)
    table.insert(kept, 1, credits - give)
    table.insert(kept, 1, lot_id)
  end
end
local to_lots, to_expired, to_revoked = return_credits(back)
incr('credits_held', -rec.c)
incr('credits_spent', charge)
unspend(rec.m, rec.c - charge)
rec.l = kept
rec.ch, rec.rf = charge, rec.c - charge
resolve(rid, rec, 'committed')
ledger('commit', hold_fields(rid, rec, {'credits', charge, 'free', result.free_charged,
                                        'returned', rec.c - charge, 'to_lots', to_lots, 'to_expired', to_expired,
                                        'to_revoked', to_revoked, 'lots', lots_text(kept)}))

local _, balance = live_lots()
result.balance = balance
return reply(result)
