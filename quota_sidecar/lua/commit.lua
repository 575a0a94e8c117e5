-- Commit: a hold becomes spend, optionally at a lower actual cost; the rest
-- goes back to the lots it came from (latest-expiring first, so the credits
-- that expire soonest are the ones spent).
--
-- Each reservation resolves once: a repeated Commit with the same outcome
-- replays it; a Commit after Release or expiry is refused.
-- Times are in milliseconds; credits are integers.
local pinned_ms    = tonumber(ARGV[1])
local rid          = ARGV[2]
local retention_ms = tonumber(ARGV[3])
local COSTS_AT     = 4  -- count, then (product, actual_cost) pairs;
-- actual_cost -1, or a product missing from the table: charge the whole
-- hold; -2: the params are invalid for that product.

local now_ms = clock_ms(pinned_ms)
local rec = load_record(rid)
if not rec then return fail('RESERVATION_NOT_FOUND') end

local function actual_cost_for(product)
  local n = tonumber(ARGV[COSTS_AT])
  for i = 0, n - 1 do
    local base = COSTS_AT + 1 + 2 * i
    if ARGV[base] == product then return tonumber(ARGV[base + 1]) end
  end
  return -1
end

local actual = actual_cost_for(rec.p)
-- Bad input changes nothing, not even lazy expiry.
if actual == -2 then return fail('INVALID_PARAMS', {product = rec.p}) end

local charge = rec.c
if rec.f == 'credits' and actual >= 0 then charge = actual end
if rec.f == 'free' then charge = 0 end

settle_if_due(rid, rec, now_ms)
local result = {funding = rec.f, charged = charge, refunded = rec.c - charge,
                free_charged = (rec.f == 'free') and 1 or 0, replayed = 0}

if rec.s == 'committed' then
  if rec.ch ~= charge then return fail('COMMIT_COST_MISMATCH', {charged = rec.ch}) end
  local _, balance = live_lots(now_ms)
  result.replayed, result.balance = 1, balance
  result.refunded = rec.rf
  return reply(result)
end
if rec.s == 'released' then return fail('ALREADY_RELEASED') end
if rec.s == 'expired' then return fail('EXPIRED', {expired_ms = rec.r}) end
if charge > rec.c then return fail('COST_EXCEEDS_HOLD', {held = rec.c, actual = charge}) end

sweep(now_ms, retention_ms)

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
return_credits(back, now_ms)
redis.call('HINCRBY', K_ACCT, 'credits_spent', charge)
rec.l = kept
rec.ch, rec.rf = charge, rec.c - charge
resolve(rid, rec, 'committed', now_ms)

local _, balance = live_lots(now_ms)
result.balance = balance
return reply(result)
