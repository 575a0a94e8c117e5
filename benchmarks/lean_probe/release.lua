-- LEAN PROBE (a measurement of a proposed design, not production code): see benchmarks/lean_probe.py.
-- Release the whole hold: a free hold gives its units back to the window counters it took
-- them from, a credits hold its credits to the lots it came from (a lot expired since: those
-- credits expire instead), month spend and held go down, inflight - 1, the record becomes
-- "r|product|fp|funding|credits returned|resolved_ms", one outbox entry, the zset member is
-- rescored to resolved_ms + retention (pruned then by the bucket sweeper).
-- KEYS: 1 account hash, 2 outbox stream, 3 hold-expiry zset.
-- ARGV: 1 now_ms (0: TIME), 2 account, 3 rid, 4 retention_ms.
-- Reply: 'ok', funding, credits returned, balance, replayed | 'err', code.
local A, K = ARGV, KEYS[1]
local fmt = string.format
-- a < b for integer strings without leading zeros (ms timestamps): no conversion to a number.
local function before(a, b) return #a < #b or (#a == #b and a < b) end
local now_s = A[1]
if now_s == '0' then
  local t = redis.call('TIME')
  now_s = t[1] .. string.sub('00000' .. t[2], -6, -4)
end
local rid = A[3]
local rk = 'r|' .. rid
local a = redis.call('HMGET', K, rk, 'seq', 'held', 'bal')
local rec = a[1]
if not rec then return {'err', 'RESERVATION_NOT_FOUND'} end
local st, product, fp, f, c = string.match(rec, '^(%a)|([^|]*)|([^|]*)|(%a)|(%d*)|')
if st == 'r' then return {'ok', f == 'f' and 'free' or 'credits', c, a[4], 1} end
if st == 'c' then return {'err', 'ALREADY_COMMITTED'} end
if st == 'x' then return {'err', 'EXPIRED'} end
local portions, free, e, month = string.match(rec,
  '^h|[^|]*|[^|]*|%a|%d*|([^|]*)|([^|]*)|(%d+)|%d*|[^|]*|%d*|%d*|%d*|%-?%d*|(%d*)$')
if not before(now_s, e) then return {'err', 'EXPIRED'} end  -- due: the sweep settles it
local seq = fmt('%d', tonumber(a[2] or 0) + 1)
local fields, kind = {'inflight|' .. product}, {}
if f == 'f' then
  for limit, label in string.gmatch(free, '([^:,]+):([^,]+)') do
    fields[#fields + 1] = 'c|' .. product .. '|' .. limit .. '|' .. label
  end
else
  fields[#fields + 1] = 'm|' .. month
  for lot in string.gmatch(portions, '([^:,]+):%d+:%d+') do fields[#fields + 1] = 'l|' .. lot end
end
local b = redis.call('HMGET', K, unpack(fields))
local set = {K, rk, 'r|' .. product .. '|' .. fp .. '|' .. f .. '|' .. c .. '|' .. now_s, 'seq', seq,
             fields[1], fmt('%d', tonumber(b[1] or 1) - 1)}
local ev = {KEYS[2], '*', 'a', A[2], 'q', seq, 't', now_s, 'k', 'release', 'r', rid}
local bal = a[4] or '0'
if f == 'f' then
  for i = 2, #fields do
    set[#set + 1] = fields[i]
    set[#set + 1] = fmt('%d', tonumber(b[i] or 1) - 1)
  end
  ev[#ev + 1] = 'df'
  ev[#ev + 1] = '-1'
else
  local credits, back, i = tonumber(c), 0, 2
  set[#set + 1] = fields[2]
  set[#set + 1] = fmt('%d', tonumber(b[2] or 0) - credits)
  for _, take, exp in string.gmatch(portions, '([^:,]+):(%d+):(%d+)') do
    i = i + 1
    if b[i] and before(now_s, exp) then
      local left, rest = string.match(b[i], '^(%d+)(|.*)$')
      set[#set + 1] = fields[i]
      set[#set + 1] = fmt('%d', tonumber(left) + tonumber(take)) .. rest
      back = back + tonumber(take)
    end
  end
  bal = tonumber(bal) + back
  set[#set + 1] = 'bal'
  set[#set + 1] = fmt('%d', bal)
  set[#set + 1] = 'held'
  set[#set + 1] = fmt('%d', tonumber(a[3] or 0) - credits)
  ev[#ev + 1] = 'dh'
  ev[#ev + 1] = '-' .. c
  if back < credits then
    ev[#ev + 1] = 'dx'
    ev[#ev + 1] = fmt('%d', credits - back)
  end
  ev[#ev + 1] = 'l'
  ev[#ev + 1] = portions
end
redis.call('HSET', unpack(set)) -- @skip hset
redis.call('ZADD', KEYS[3], 'XX', fmt('%d', tonumber(now_s) + tonumber(A[4])), A[2] .. '|' .. rid) -- @skip zadd
redis.call('XADD', unpack(ev)) -- @skip xadd
return {'ok', f == 'f' and 'free' or 'credits', c, bal, 0}
