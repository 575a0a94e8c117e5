-- GrantCredits: a new lot, idempotent by purchase_id (the lot's id). A
-- replay with the same credits returns the original lot; different credits
-- are refused. The lot is spendable by the very next decision, once open debt
-- is paid: credits that come in pay the account's debt first, from the lots
-- (soonest expiry first; in practice the new lot), as a debt_repay entry after
-- the grant's, in this same script. What was paid
-- (price, currency, pack) goes to the outbox only: the books keep it.
-- Times are in milliseconds; credits are integers.
local lot_id      = next_arg()
local credits     = tonumber(next_arg())
local expires_ms  = tonumber(next_arg())
local rank        = tonumber(next_arg())  -- spending order at equal expiry: 0 promo .. 3 purchase
local source      = next_arg()
local reason      = next_arg()
-- Minor units paid, or '-1': unknown (no price field). Kept a string: a number
-- past 14 digits would be written in Lua's exponent notation.
local price       = next_arg()
local currency    = next_arg()  -- ISO 4217 code of the price, or ''
local pack_id     = next_arg()  -- the credit pack bought, or ''

local function lot_reply(meta, replayed)
  local _, balance = live_lots()
  local left = tonumber(redis.call('HGET', K_LOTREM, lot_id) or '0')
  return reply({granted = meta.g, left = left, expires_ms = meta.e, granted_ms = meta.t, source = meta.src,
                revoked = meta.v, balance = balance, replayed = replayed, debt_paid = meta.dp or 0,
                debt = tonumber(redis.call('HGET', K_ACCT, 'debt') or '0')})
end

local meta = lot_meta(lot_id)
if meta then
  if meta.g ~= credits then return fail('PURCHASE_ID_CONFLICT', {granted = meta.g}) end
  sweep()
  return lot_reply(meta, 1)
end
if expires_ms <= now_ms then return fail('EXPIRES_IN_PAST', {now_ms = now_ms}) end
local debt = tonumber(redis.call('HGET', K_ACCT, 'debt') or '0')

sweep()
meta = {g = credits, e = expires_ms, t = now_ms, k = rank, src = source, v = 0, vr = 0, x = 0}
redis.call('HSET', K_LOTS, lot_id, cjson.encode(meta))
redis.call('HSET', K_LOTREM, lot_id, credits)
redis.call('ZADD', K_LOTEXP, lot_score(expires_ms, rank), lot_id)
incr('credits_granted', credits)
-- A grant re-arms the low-balance and auto top-up events.
redis.call('HDEL', K_NOTES, 'credits_low', 'auto_topup')
local fields = {'pid', lot_id, 'credits', credits, 'source', source, 'expires_ms', expires_ms, 'reason', reason,
                'cur', currency, 'pack', pack_id}
if price ~= '-1' then
  fields[#fields + 1] = 'price'
  fields[#fields + 1] = price
end
ledger('grant', {g = credits}, fields)
local owed = repay_debt(debt, lot_id)
if owed < debt then
  meta.dp = debt - owed  -- what this grant paid of the debt: a replay reports it again
  redis.call('HSET', K_LOTS, lot_id, cjson.encode(meta))
end
return lot_reply(meta, 0)
