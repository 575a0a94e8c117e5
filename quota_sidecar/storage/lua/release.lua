-- Release: the whole hold (free unit and credits) goes back where it came
-- from. A repeated Release replays; after Commit or expiry it is refused.
-- Times are in milliseconds; credits are integers.
local rid = next_arg()

local rec = load_settled_record(rid)
if not rec then return fail('RESERVATION_NOT_FOUND') end
local result = {funding = rec.f, refunded = rec.c,
                free_refunded = (rec.f == 'free') and 1 or 0, replayed = 0}

if rec.s == 'committed' then return fail('ALREADY_COMMITTED') end
if rec.s == 'expired' then return fail('EXPIRED', {resolved_ms = rec.r}) end
sweep()  -- also on a replay: the balance reported is the one a GetBalance at this instant shows
if rec.s == 'released' then
  result.replayed = 1
else
  local moved, deltas = refund_hold(rec)
  resolve(rid, rec, 'released')
  ledger('release', deltas, hold_fields(rid, rec, moved))
end

local _, balance = live_lots()
result.balance = balance
return reply(result)
