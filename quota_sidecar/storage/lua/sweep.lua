-- Sweep: the background sweeper's visit to an account nobody is calling:
-- expired lots and holds are settled exactly as a decision would, records
-- past their retention are dropped, and lots about to expire with credits
-- left are announced (once per lot).
-- Times are in milliseconds.
local notice_ms = tonumber(next_arg())

-- An idle account's records are dropped here or never: nothing else calls for it. Bounded
-- per visit so one account cannot stall Redis; the next pass takes the rest.
local SWEEP_PRUNE_BATCHES = 64
local expired = sweep()
local pruned = 0
for _ = 1, SWEEP_PRUNE_BATCHES do
  local n = prune_records(PRUNE_BATCH)
  pruned = pruned + n
  if n < PRUNE_BATCH then break end
end
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
return reply({expired = expired, pruned = pruned, now_ms = now_ms})
