-- RevokeCredits (chargeback): what is left of a purchase's lot is removed.
-- Credits of the lot in active holds are revoked when those holds end
-- unspent (see return_credits); what was spent is reported, not clawed back.
-- Idempotent. Credits are integers.
local lot_id = next_arg()
local reason = next_arg()

local meta = lot_meta(lot_id)
if not meta then return fail('PURCHASE_NOT_FOUND') end
sweep()  -- an expired lot's credits are expired, not revoked
meta = lot_meta(lot_id)

local replayed = meta.v == 1 and 1 or 0
if replayed == 0 then
  local left = tonumber(redis.call('HGET', K_LOTREM, lot_id) or '0')
  redis.call('HSET', K_LOTREM, lot_id, 0)
  redis.call('ZREM', K_LOTEXP, lot_id)
  redis.call('HDEL', K_NOTES, 'lot_expiring:' .. lot_id)
  meta.v, meta.vn, meta.vr = 1, left, (meta.vr or 0) + left
  redis.call('HSET', K_LOTS, lot_id, cjson.encode(meta))
  incr('credits_revoked', left)
  ledger('revoke', {v = left}, {'pid', lot_id, 'credits', left, 'reason', reason})
end
local held = tonumber(redis.call('HGET', K_LOTREM, lot_hold_field(lot_id)) or '0')
local _, balance = live_lots()
-- Per lot: granted = left + held + expired + revoked + spent (net of job refunds).
local spent = meta.g - held - (meta.x or 0) - (meta.vr or 0)
return reply({revoked = meta.vn or 0, spent = spent, held = held, balance = balance, replayed = replayed})
