-- Release: the whole hold (free unit and credits) goes back where it came
-- from. A repeated Release replays; after Commit or expiry it is refused.
-- Times are in milliseconds; credits are integers.
local pinned_ms    = tonumber(ARGV[1])
local rid          = ARGV[2]
local retention_ms = tonumber(ARGV[3])

local now_ms = clock_ms(pinned_ms)
local rec = load_settled_record(rid, now_ms)
if not rec then return fail('RESERVATION_NOT_FOUND') end
local result = {funding = rec.f, refunded = rec.c,
                free_refunded = (rec.f == 'free') and 1 or 0, replayed = 0}

if rec.s == 'committed' then return fail('ALREADY_COMMITTED') end
if rec.s == 'expired' then return fail('EXPIRED', {expired_ms = rec.r}) end
if rec.s == 'released' then
  result.replayed = 1
else
  sweep(now_ms, retention_ms)
  refund_hold(rec, now_ms)
  resolve(rid, rec, 'released', now_ms)
end

local _, balance = live_lots(now_ms)
result.balance = balance
return reply(result)
