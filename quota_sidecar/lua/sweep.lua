-- Sweep: the background sweeper's visit to an account nobody is calling:
-- expired lots and holds are settled exactly as a decision would, and lots
-- about to expire with credits left are announced (once per lot).
-- Times are in milliseconds.
local notice_ms = tonumber(next_arg())

local expired = sweep()
local soon = redis.call('ZRANGEBYSCORE', K_LOTEXP, '(' .. expired_score_max(),
                        (now_ms + notice_ms) * RANKS + RANKS - 1)
for _, lot_id in ipairs(soon) do
  local left = tonumber(redis.call('HGET', K_LOTREM, lot_id) or '0')
  if left > 0 then
    local meta = lot_meta(lot_id)
    emit_once('lot_expiring:' .. lot_id, 'lot_expiring',
              {'pid', lot_id, 'credits_left', left, 'expires_ms', meta.e})
  end
end
return reply({expired = expired, now_ms = now_ms})
