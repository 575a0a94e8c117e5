-- LEAN PROBE (a measurement of a proposed design, not production code): see benchmarks/lean_probe.py.
-- Commit the whole hold: the record becomes a compact resolved record
-- "c|product|fp|funding|charged|resolved_ms" (kept for replays; the hold-expiry zset member is
-- rescored to resolved_ms + retention so the bucket sweeper prunes it then), held -> spent,
-- inflight - 1, one outbox entry. A lower actual cost (a partial refund) is not modelled.
-- KEYS: 1 account hash, 2 outbox stream, 3 hold-expiry zset.
-- ARGV: 1 now_ms (0: TIME), 2 account, 3 rid, 4 retention_ms.
-- Reply: 'ok', funding, charged, replayed | 'err', code.
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
local a = redis.call('HMGET', K, rk, 'seq', 'held', 'spent')
local rec = a[1]
if not rec then return {'err', 'RESERVATION_NOT_FOUND'} end
local st, product, fp, f, c = string.match(rec, '^(%a)|([^|]*)|([^|]*)|(%a)|(%d*)|')
if st == 'c' then return {'ok', f == 'f' and 'free' or 'credits', c, 1} end
if st == 'r' then return {'err', 'ALREADY_RELEASED'} end
if st == 'x' then return {'err', 'EXPIRED'} end
local e = string.match(rec, '^h|[^|]*|[^|]*|%a|%d*|[^|]*|[^|]*|(%d+)|')
if not before(now_s, e) then return {'err', 'EXPIRED'} end  -- due: the sweep settles it
local seq = fmt('%d', tonumber(a[2] or 0) + 1)
local set = {K, rk, 'c|' .. product .. '|' .. fp .. '|' .. f .. '|' .. c .. '|' .. now_s, 'seq', seq}
local ev = {KEYS[2], '*', 'a', A[2], 'q', seq, 't', now_s, 'k', 'commit', 'r', rid}
if f == 'c' then
  local credits = tonumber(c)
  set[#set + 1] = 'held'
  set[#set + 1] = fmt('%d', tonumber(a[3] or 0) - credits)
  set[#set + 1] = 'spent'
  set[#set + 1] = fmt('%d', tonumber(a[4] or 0) + credits)
  ev[#ev + 1] = 'ds'
  ev[#ev + 1] = c
  ev[#ev + 1] = 'dh'
  ev[#ev + 1] = '-' .. c
end
redis.call('HSET', unpack(set)) -- @skip hset
redis.call('HINCRBY', K, 'inflight|' .. product, -1) -- @skip hincrby
redis.call('ZADD', KEYS[3], 'XX', fmt('%d', tonumber(now_s) + tonumber(A[4])), A[2] .. '|' .. rid) -- @skip zadd
redis.call('XADD', unpack(ev)) -- @skip xadd
return {'ok', f == 'f' and 'free' or 'credits', c, 0}
