-- GrantCredits: a new lot, idempotent by purchase_id (the lot's id). A
-- replay with the same credits returns the original lot; different credits
-- are refused. The lot is spendable by the very next decision.
-- Times are in milliseconds; credits are integers.
local pinned_ms    = tonumber(ARGV[1])
local lot_id       = ARGV[2]
local credits      = tonumber(ARGV[3])
local expires_ms   = tonumber(ARGV[4])
local retention_ms = tonumber(ARGV[5])

local now_ms = clock_ms(pinned_ms)
local raw = redis.call('HGET', K_LOTS, lot_id)
if raw then
  local lot = cjson.decode(raw)
  if lot.g ~= credits then return fail('PURCHASE_ID_CONFLICT', {granted = lot.g}) end
  sweep(now_ms, retention_ms)
  local _, balance = live_lots(now_ms)
  local left = tonumber(redis.call('HGET', K_LOTREM, lot_id) or '0')
  return reply({granted = lot.g, left = left, expires_ms = lot.e, granted_ms = lot.t,
                balance = balance, replayed = 1})
end
if expires_ms <= now_ms then return fail('EXPIRES_IN_PAST', {now_ms = now_ms}) end

sweep(now_ms, retention_ms)
redis.call('HSET', K_LOTS, lot_id, cjson.encode({g = credits, e = expires_ms, t = now_ms}))
redis.call('HSET', K_LOTREM, lot_id, credits)
redis.call('ZADD', K_LOTEXP, expires_ms, lot_id)
redis.call('HINCRBY', K_ACCT, 'credits_granted', credits)
local _, balance = live_lots(now_ms)
return reply({granted = credits, left = credits, expires_ms = expires_ms, granted_ms = now_ms,
              balance = balance, replayed = 0})
