-- Degraded replay: a reservation a sidecar allowed while Redis was
-- unreachable (fail_open_free) is written in, idempotently by its id, with
-- its hold and, once known, its resolution in the outbox. Its free unit is
-- counted under the product's "degraded" limit of the local day it was
-- decided in, apart from the plan's limits, and marked as not enforced: the
-- plan's limits were not checked when it was allowed.
--
-- Redis may already hold a record under the same id: this replay's own
-- earlier write (the journal then resolved it), or the reserve script the
-- sidecar sent before it gave up on Redis, run once Redis came back. Either
-- way the worker was told the journalled outcome, so it is applied to that
-- record: an acknowledged Commit ends committed (the hold the record holds is
-- charged: the job ran) and a Release ends released. A record already
-- resolved the other way cannot be changed without spending or refunding
-- twice; the journalled outcome is then kept on the record (dj, djr) and in
-- the outbox (degraded_conflict) for the audit and support.
--
-- The header's pinned time is the decision's time. Times are in milliseconds.
-- Reply: {outcome = 'written' | 'resolved' | 'present' | 'conflict', state}.
local rid         = next_arg()
local product     = next_arg()
local fingerprint = next_arg()
local label       = next_arg()  -- the local day (YYYYMMDD) the sidecar decided in
local allowance   = tonumber(next_arg())
local ttl_ms      = tonumber(next_arg())
local state       = next_arg()  -- held, committed or released
local resolved_ms = tonumber(next_arg())

-- The journalled Commit or Release, applied to a held record (not settled by its
-- TTL first: the worker's call came before it).
local function apply_journalled(rec)
  now_ms = math.max(resolved_ms, rec.cr)
  if state == 'committed' then
    commit_hold(rid, rec, rec.c, {'degraded', 1})
  else
    local moved, deltas = refund_hold(rec)
    resolve(rid, rec, 'released')
    moved[#moved + 1] = 'degraded'
    moved[#moved + 1] = 1
    ledger('release', deltas, hold_fields(rid, rec, moved))
  end
end

local function reconcile(rec)
  -- Released and expired both gave the hold back: the same money.
  if state == 'held' or rec.s == state or (state == 'released' and rec.s == 'expired') then
    return reply({outcome = 'present', state = rec.s})
  end
  if rec.s == 'held' then
    apply_journalled(rec)
    return reply({outcome = 'resolved', state = state})
  end
  if rec.dj == nil then
    rec.dj, rec.djr = state, resolved_ms
    save_record(rid, rec)
    -- Nothing moves: the record keeps Redis' outcome; the entry tells the books what was acknowledged.
    ledger('degraded_conflict', {}, hold_fields(rid, rec, {'journal', state, 'journal_ms', resolved_ms,
                                                           'redis', rec.s}))
  end
  return reply({outcome = 'conflict', state = rec.s})
end

local existing = load_record(rid)
if existing then return reconcile(existing) end

local field = product .. '|degraded|d' .. label
local used = tonumber(redis.call('HINCRBY', K_FREE, field, 1))
local decision = {allowed = 1, plan = '', tz = '', cost = 0, free_used = used, free_limit = allowance,
                  resets_ms = 0, balance = 0, held = 0, expires_ms = now_ms + ttl_ms, now_ms = now_ms,
                  replayed = 0, pv = PLANS_VERSION, funding = 'free', degraded = 1}
local rec = {s = 'held', p = product, fp = fingerprint, c = 0, l = {}, fw = {'h' .. field}, m = '', f = 'free',
             pv = PLANS_VERSION, cr = now_ms, e = now_ms + ttl_ms, ttl = ttl_ms, dg = 1, pl = '', rc = 0,
             d = cjson.encode(decision)}
local units = cjson.encode({{k = 'h' .. field, u = used, l = allowance, s = 1}})
ledger('hold', {f = 1}, hold_fields(rid, rec, {'credits', 0, 'free', 1, 'window', label, 'free_units', units,
                                                'degraded', 1}))

save_record(rid, rec)
redis.call('ZADD', K_HOLDS, rec.e, rid)
redis.call('HINCRBY', K_INFLIGHT, product, 1)
if state ~= 'held' then apply_journalled(rec) end
return reply({outcome = 'written', state = state})
