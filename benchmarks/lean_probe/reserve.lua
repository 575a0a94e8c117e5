-- LEAN PROBE (a measurement of a proposed design, not production code): see benchmarks/lean_probe.py.
-- CheckAndReserve as one self-contained script: no prelude, no cjson, few conversions.
--
-- KEYS (one hash tag): 1 account hash, 2 plans hash of the plans version in force,
--   3 outbox stream, 4 hold-expiry zset (member "<account>|<rid>", score expires_ms).
-- ARGV: 1 now_ms (0: TIME), 2 account, 3 rid, 4 product, 5 fingerprint, 6 ttl_ms, 7 job cost (credits),
--   8 expected tz, 9/10 day label/end_ms, 11/12 week label/end_ms, 13/14 month label (YYYYMM)/end_ms.
-- Account hash: plan tz debt held bal seq cap due lx(lot ids, soonest expiry first), c|<product>|<limit>|<label>,
--   l|<lot> = "<left>|<expires_ms>|<rank>", r|<rid> = record (below), inflight|<product>, m|<YYYYMM>.
-- Record: state(h/c/r/x)|product|fp|funding(f/c)|credits|lots "id:take:exp,.."|free "limit:label,.."|
--   expires_ms|cost|plan|free_used|free_limit|resets_ms|balance|month (credits: the spend month)
--   (resolved: "<c|r|x>|product|fp|funding|credits charged or returned|resolved_ms")
-- Reply (flat): 'ok', funding, expires_ms, held, balance, free_used, free_limit, resets_ms, replayed, plan,
--   then per limit id, used, free, resets_ms | 'deny', code, free_used, free_limit, resets_ms, balance, plan, ...
--   | 'err', code [, detail] | 'retry', code (nothing written: MISSING_PLANS, WINDOW, SWEEP).
local A, K = ARGV, KEYS[1]
local fmt = string.format
-- a < b for integer strings without leading zeros (ms timestamps): no conversion to a number.
local function before(a, b) return #a < #b or (#a == #b and a < b) end
local now_s = A[1]
if now_s == '0' then
  local t = redis.call('TIME')
  now_s = t[1] .. string.sub('00000' .. t[2], -6, -4)
end
local acct_id, rid, product, fp = A[2], A[3], A[4], A[5]
local month = A[13]
-- @cut args
local a = redis.call('HMGET', K, 'r|' .. rid, 'plan', 'tz', 'debt', 'due', 'seq', 'bal', 'held', 'cap', 'lx',
                     'inflight|' .. product, 'm|' .. month)
-- @cut acct
local rec = a[1]
if rec then
  local st, p, rfp = string.match(rec, '^(%a)|([^|]*)|([^|]*)|')
  if rfp ~= fp or p ~= product then return {'err', 'RESERVATION_PARAMS_MISMATCH'} end
  if st == 'c' then return {'err', 'ALREADY_COMMITTED'} end
  if st == 'r' then return {'err', 'ALREADY_RELEASED'} end
  if st == 'x' then return {'err', 'EXPIRED'} end
  local f, c, e, pl, u, l, rs, b = string.match(rec,
    '^h|[^|]*|[^|]*|(%a)|(%d*)|[^|]*|[^|]*|(%d*)|%d*|([^|]*)|(%d*)|(%d*)|(%d*)|(%-?%d*)|')
  if not before(now_s, e) then return {'err', 'EXPIRED'} end  -- due: the account's sweep settles it
  return {'ok', f == 'f' and 'free' or 'credits', e, c, b, u, l, rs, 1, pl}
end
local plan, tz = a[2] or 'free', a[3] or 'UTC'
if tz ~= A[8] then return {'err', 'TZ_MISMATCH', tz} end
-- Something of this account (a hold, a lot) is due: the sidecar runs the account's sweep, then retries.
if a[5] and not before(now_s, a[5]) then return {'retry', 'SWEEP'} end
if not (before(now_s, A[10]) and before(now_s, A[12]) and before(now_s, A[14])) then return {'retry', 'WINDOW'} end
-- @cut checks
local row = redis.call('HGET', KEYS[2], product .. '|' .. plan)
if not row then
  if redis.call('EXISTS', KEYS[2]) == 0 then return {'retry', 'MISSING_PLANS'} end
  return {'err', 'UNKNOWN_PLAN', plan}
end
local entitled, max_conc, limits = string.match(row, '^(%d)|(%d+)|(.*)$')
-- @cut plan
-- Every limit of the product: day and week counters (rolling limits: not in the probe).
local ids, kinds, frees, shadows, fields, labels, ends = {}, {}, {}, {}, {}, {}, {}
local n = 0
for id, kind, free, _, shadow in string.gmatch(limits, '([^:,]+):(%a):(%d+):(%d+):(%d)') do
  local label, ends_ms = A[9], A[10]
  if kind == 'w' then label, ends_ms = A[11], A[12] end
  n = n + 1
  ids[n], kinds[n], frees[n], shadows[n], labels[n], ends[n] = id, kind, free, shadow, label, ends_ms
  fields[n] = 'c|' .. product .. '|' .. id .. '|' .. label
end
local used = n > 0 and redis.call('HMGET', K, unpack(fields)) or {}
local room, head = true, nil
for i = 1, n do
  local u, f = tonumber(used[i] or 0), tonumber(frees[i])
  used[i], frees[i] = u, f
  if u + 1 > f and shadows[i] ~= '1' then room = false end
  if shadows[i] ~= '1' and (head == nil or frees[i] - u < frees[head] - used[head]) then head = i end
end
-- @cut limits
local bal = a[7] or '0'  -- a string until the credits path needs a number
local h_used, h_free, h_resets = 0, 0, A[10]
if head then h_used, h_free, h_resets = used[head], frees[head], ends[head] end
local function deny(code, extra)
  local out = {'deny', code, h_used, h_free, h_resets, bal, plan}
  if extra then out[#out + 1] = extra end
  return out
end
if entitled ~= '1' then return deny('NOT_ENTITLED') end
local debt = a[4]
if debt and debt ~= '0' then return deny('PURCHASE_REQUIRED', debt) end
local inflight = a[11] or '0'
if max_conc ~= '0' and not before(inflight, max_conc) then return deny('CONCURRENCY_LIMIT', inflight) end

local expires = fmt('%d', tonumber(now_s) + tonumber(A[6]))
local seq = fmt('%d', tonumber(a[6] or 0) + 1)
local member = acct_id .. '|' .. rid
local due = a[5]
local set = {K, 'inflight|' .. product, fmt('%d', tonumber(inflight) + 1), 'seq', seq}
if not due or before(expires, due) then set[#set + 1] = 'due'; set[#set + 1] = expires end
local reply, ev
if room then
  local taken = {}
  for i = 1, n do
    set[#set + 1] = fields[i]
    set[#set + 1] = fmt('%d', used[i] + 1)
    taken[i] = ids[i] .. ':' .. labels[i]
  end
  if head then h_used = used[head] + 1 end
  taken = table.concat(taken, ',')
  set[#set + 1] = 'r|' .. rid
  set[#set + 1] = 'h|' .. product .. '|' .. fp .. '|f|0||' .. taken .. '|' .. expires .. '|' .. A[7] .. '|' .. plan
    .. '|' .. fmt('%d|%d|', h_used, h_free) .. h_resets .. '|' .. bal .. '|'
  reply = {'ok', 'free', expires, 0, bal, h_used, h_free, h_resets, 0, plan}
  ev = {KEYS[3], '*', 'a', acct_id, 'q', seq, 't', now_s, 'k', 'hold', 'df', n > 0 and '1' or '0', 'r', rid,
        'p', product, 'w', taken, 'e', expires, 'c', A[7]}
  -- @cut free_decided
else
  local cost = tonumber(A[7])
  bal = tonumber(bal)
  if bal < cost then return deny('PURCHASE_REQUIRED', cost - bal) end
  local spend, cap = tonumber(a[12] or 0), tonumber(a[9] or 0)
  if cap > 0 and spend + cost > cap then return deny('BUDGET_EXCEEDED', spend) end
  -- Live lots, soonest expiry first (the due check above means none of them has expired).
  local lot_ids, lot_fields = {}, {}
  for id in string.gmatch(a[10] or '', '[^,]+') do
    lot_ids[#lot_ids + 1] = id
    lot_fields[#lot_fields + 1] = 'l|' .. id
  end
  if #lot_fields == 0 then return {'err', 'ACCOUNT_CORRUPT', 'bal'} end
  local lots = redis.call('HMGET', K, unpack(lot_fields))
  -- @cut lots_read
  local need, portions = cost, {}
  for i = 1, #lot_ids do
    if need == 0 then break end
    local left, rest = string.match(lots[i] or '0|0|0', '^(%d+)(|.*)$')
    left = tonumber(left)
    if left > 0 then
      local take = left < need and left or need
      need = need - take
      set[#set + 1] = lot_fields[i]
      set[#set + 1] = fmt('%d', left - take) .. rest
      portions[#portions + 1] = lot_ids[i] .. ':' .. fmt('%d', take) .. ':' .. string.match(rest, '^|(%d+)')
    end
  end
  if need > 0 then return {'err', 'ACCOUNT_CORRUPT', 'bal'} end  -- bal said the lots hold it
  portions = table.concat(portions, ',')
  bal = bal - cost
  set[#set + 1] = 'bal'
  set[#set + 1] = fmt('%d', bal)
  set[#set + 1] = 'held'
  set[#set + 1] = fmt('%d', tonumber(a[8] or 0) + cost)
  set[#set + 1] = 'm|' .. month
  set[#set + 1] = fmt('%d', spend + cost)
  set[#set + 1] = 'r|' .. rid
  set[#set + 1] = 'h|' .. product .. '|' .. fp .. '|c|' .. A[7] .. '|' .. portions .. '||' .. expires .. '|' .. A[7]
    .. '|' .. plan .. '|' .. fmt('%d|%d|', h_used, h_free) .. h_resets .. '|' .. fmt('%d', bal) .. '|' .. month
  reply = {'ok', 'credits', expires, cost, bal, h_used, h_free, h_resets, 0, plan}
  ev = {KEYS[3], '*', 'a', acct_id, 'q', seq, 't', now_s, 'k', 'hold', 'dh', A[7], 'r', rid,
        'p', product, 'l', portions, 'm', month, 'e', expires, 'c', A[7]}
  -- @cut credits_decided
end
-- Every limit's state, as the reply reports it (one line, so the profile can drop it).
for i = 1, n do local k = #reply; reply[k + 1], reply[k + 2], reply[k + 3], reply[k + 4] = ids[i], used[i] + (room and 1 or 0), frees[i], ends[i] end -- @skip limits_reply
-- @cut reply_built
redis.call('HSET', unpack(set)) -- @skip hset
-- @cut hset
redis.call('ZADD', KEYS[4], expires, member) -- @skip zadd
-- @cut zadd
redis.call('XADD', unpack(ev)) -- @skip xadd
return reply
