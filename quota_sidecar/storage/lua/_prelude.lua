-- Shared helpers of every quota-sidecar script.
--
-- The store puts this file in front of each operation script (reserve.lua,
-- commit.lua, ...), so every operation is still ONE script call: FCALL of one
-- function of a library holding every script (Redis 7), or EVALSHA of the
-- script (Redis 6.2); see storage/scripts.py. Nothing here runs on its own.
--
-- Units: times are integer milliseconds since the Unix epoch; credits and
-- free units are integers. Every key is passed in KEYS[], all under the
-- hash tag of the account's bucket, so each script touches one cluster slot.
--
-- KEYS (same order in every script):
--   1 acct     HASH  plan, tz, cap, at_on/at_thr/at_pack (auto top-up), the
--                    totals credits_granted/_spent/_expired/_revoked/_refunded/_held,
--                    debt (credits owed: usage drawn past the lots under `overage: draw`,
--                    paid first by the next credits to come in) and seq, the account's
--                    last outbox sequence number
--   2 free     HASH  "<product>|<limit>|d<YYYYMMDD>" or "...|w<monday YYYYMMDD>" -> free
--                    units held or spent in that window (a field at zero is dropped)
--   3 lots     HASH  lot_id -> JSON {g = granted, e = expires_ms, t = granted_ms,
--                    k = source rank, src = source, v = 1 if revoked,
--                    vr = credits revoked, x = credits expired}
--   4 lotrem   HASH  lot_id -> credits left in the lot; "<lot_id>|h" -> its credits in open holds
--   5 lotexp   ZSET  live lots (credits left, not revoked) scored expires_ms * 8 + rank,
--                    so equal expiries order promo < compensation < refund < purchase
--   6 holds    ZSET  reservation_id scored by expires_ms; only unresolved holds
--   7 res      HASH  reservation_id -> JSON reservation record (see reserve.lua)
--   8 resdone  ZSET  reservation_id scored by resolved_ms; for pruning old records
--   9 outbox   STREAM every movement of the whole bucket (shared by its accounts), until the
--                    shipper has copied it into the books and trimmed it (see ledger() below)
--  10 notes    HASH  events already emitted ("<event>|<scope>") -> when
--  11 spend    HASH  "<YYYYMM>" -> credits held or spent that month (the spend cap's measure)
--  12 rolling  ZSET  "<product>|<limit>|<reservation_id>" scored by use time: rolling windows
--  13 inflight HASH  product -> unresolved reservations (the concurrency cap's measure; dropped at zero)
--  14 events   STREAM usage events of the whole bucket (shared by its accounts)
--
-- Free units: a day or week limit counts in the free hash under
-- "<product>|<limit>|d<YYYYMMDD>" or "|w<monday YYYYMMDD>"; a rolling limit
-- counts the rolling zset members of the last `hours` hours, so it is exact.
-- A reservation records what it took as "h<free field>" / "z<rolling member>".
-- A job takes 1 unit of each; a metered product's job takes its usage in
-- whole credits (included usage, rec.fu): the counters grow by that amount
-- and its rolling member ends in "|<amount>".
--
-- ARGV starts with the same header everywhere; each script reads its own
-- arguments after it with next_arg()/next_block():
--   1 pinned now_ms (0: Redis' clock)   2 account_id   3 record retention ms
--   4 events stream max length          5 plans version
--   6 resolved records kept per account at most (the oldest go first)
--   7 open holds per account at most (a new hold past it is refused)

-- Per-call state. Declared here, at the top, and set by begin() at the start
-- of every call: in a Redis Function library (Redis 7) this file's top level
-- runs once, when the library is loaded, and each call only runs its
-- function, which calls begin() first; a script sent by EVALSHA (Redis 6.2)
-- calls begin() right after this file (storage/scripts.py). Any top-level
-- local a function assigns must be declared here and reset in begin(): in a
-- library it would otherwise carry one call's value into the next.
local K_ACCT, K_FREE, K_LOTS, K_LOTREM
local K_LOTEXP, K_HOLDS, K_RES, K_RESDONE
local K_OUTBOX, K_NOTES, K_SPEND, K_ROLLING
local K_INFLIGHT, K_EVENTS
-- The one clock every sidecar agrees on is Redis' own. A non-zero pinned
-- value is the engine's injected clock (tests, deterministic replays).
local now_ms
local ACCOUNT_ID, RETENTION_MS, EVENTS_MAX, PLANS_VERSION
-- What one account can make Redis hold, whatever it does: records of resolved
-- reservations beyond MAX_RECORDS go before their retention ends (a retry of
-- one of those decides again), and a hold beyond MAX_HOLDS is refused.
local MAX_RECORDS, MAX_HOLDS
-- The ARGV index next_arg() read last.
local cursor
-- Effects collected between defer_effects() and take_effects() (see below).
local deferred_effects

-- Bounds the work lazy expiry does in one call; the rest waits for the next.
local EXPIRE_BATCH = 64
local PRUNE_BATCH = 16
local RANKS = 8  -- lot score = expires_ms * RANKS + source rank
local HOUR_MS = 3600000
local MAX_ROLLING_MS = 168 * HOUR_MS  -- the longest rolling window a limit may have
-- What a call that needs a live hold answers for a reservation resolved otherwise.
local RESOLVED_REFUSALS = {committed = 'ALREADY_COMMITTED', released = 'ALREADY_RELEASED', expired = 'EXPIRED'}
local TOTALS = {'credits_granted', 'credits_spent', 'credits_expired', 'credits_revoked',
                'credits_refunded', 'credits_held'}

local function redis_time_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Every call starts here: the per-call state above from this call's KEYS and
-- ARGV (and Redis' clock).
local function begin()
  K_ACCT, K_FREE, K_LOTS, K_LOTREM = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  K_LOTEXP, K_HOLDS, K_RES, K_RESDONE = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
  K_OUTBOX, K_NOTES, K_SPEND, K_ROLLING = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
  K_INFLIGHT, K_EVENTS = KEYS[13], KEYS[14]
  local pinned_ms = tonumber(ARGV[1])
  now_ms = pinned_ms > 0 and pinned_ms or redis_time_ms()
  ACCOUNT_ID = ARGV[2]
  RETENTION_MS = tonumber(ARGV[3])
  EVENTS_MAX = tonumber(ARGV[4])
  PLANS_VERSION = ARGV[5]
  MAX_RECORDS = tonumber(ARGV[6])
  MAX_HOLDS = tonumber(ARGV[7])
  cursor = 7
  deferred_effects = nil
end

local function next_arg()
  cursor = cursor + 1
  return ARGV[cursor]
end
-- Skips a count followed by that many rows of `width` arguments; returns the
-- count's ARGV index. The decision then reads only the rows it needs: turning
-- every argument into tables cost more Redis CPU than the decision itself.
local function skip_block(width)
  local at = cursor + 1
  cursor = at + tonumber(ARGV[at]) * width
  return at
end
-- The ARGV index of the first field of the row (of the block at `at`) whose
-- first field is `name`, or nil.
local function find_row(at, width, name)
  for i = 1, tonumber(ARGV[at]) do
    local first = at + 1 + (i - 1) * width
    if ARGV[first] == name then return first end
  end
  return nil
end
-- A count followed by that many rows of `width` arguments.
local function next_block(width)
  local rows = {}
  for i = 1, tonumber(next_arg()) do
    local row = {}
    for j = 1, width do row[j] = next_arg() end
    rows[i] = row
  end
  return rows
end

local function reply(tbl) return cjson.encode(tbl) end
local function fail(code, extra)
  local tbl = extra or {}
  tbl.error = code
  return cjson.encode(tbl)
end

local function load_record(rid)
  local raw = redis.call('HGET', K_RES, rid)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function save_record(rid, rec)
  redis.call('HSET', K_RES, rid, cjson.encode(rec))
end

local function lot_meta(lot_id)
  local raw = redis.call('HGET', K_LOTS, lot_id)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function lot_score(expires_ms, rank) return expires_ms * RANKS + rank end
local function score_expiry(score) return math.floor(tonumber(score) / RANKS) end
-- Scores at or below this belong to lots expired by now.
local function expired_score_max() return now_ms * RANKS + RANKS - 1 end

local function incr(field, delta)
  if delta ~= 0 then redis.call('HINCRBY', K_ACCT, field, delta) end
end

-- Effects (outbox entries and usage events) are written at once, or, between
-- defer_effects() and take_effects(), collected instead: reserve_all.lua writes
-- only those of the items that stand. Each is {'o', kind, at_ms, deltas,
-- fields} (an outbox entry, see ledger) or {'n', note, XADD args} (an event
-- written once per note).
local function defer_effects() deferred_effects = {} end
local function take_effects()
  local effects = deferred_effects
  deferred_effects = nil
  return effects
end

-- The account totals an entry moves, as its delta fields dg dr ds dx dv dh df dd
-- (granted, refunded, spent, expired, revoked, held, free units, debt), in this
-- order. Available credits are not written: granted + refunded - spent - expired -
-- revoked - held + debt (a debt is credits spent that no lot has paid yet).
local DELTAS = {'g', 'r', 's', 'x', 'v', 'h', 'f', 'd'}

-- One movement, one entry of the bucket's outbox: a account, q the account's
-- sequence number, t when (ms), k kind, the non-zero deltas, then the kind's own
-- fields. The sequence number is taken only now, when the entry is written, so a
-- deferred entry that is never written leaves no gap for the audit to find. No
-- MAXLEN: only the shipper trims, after the books hold the entries.
local function write_entry(kind, at_ms, deltas, fields)
  local seq = redis.call('HINCRBY', K_ACCT, 'seq', 1)
  local args = {K_OUTBOX, '*', 'a', ACCOUNT_ID, 'q', seq, 't', at_ms, 'k', kind}
  for _, name in ipairs(DELTAS) do
    local value = deltas[name]
    -- Never a zero (nor "-0", which Lua prints for a negated zero).
    if value and value ~= 0 then
      args[#args + 1] = 'd' .. name
      args[#args + 1] = value
    end
  end
  for i = 1, #fields do args[#args + 1] = fields[i] end
  redis.call('XADD', unpack(args))
end

-- deltas: {g = .., r = .., s = .., x = .., v = .., h = .., f = .., d = ..}, absent = 0.
local function ledger(kind, deltas, fields)
  if deferred_effects then
    deferred_effects[#deferred_effects + 1] = {'o', kind, now_ms, deltas, fields}
  else
    write_entry(kind, now_ms, deltas, fields)
  end
end

local function write_effects(effects)
  for _, e in ipairs(effects) do
    if e[1] == 'o' then
      write_entry(e[2], e[3], e[4], e[5])
    elseif redis.call('HSETNX', K_NOTES, e[2], now_ms) == 1 then
      redis.call('XADD', unpack(e[3]))
    end
  end
end

local function emit_args(kind, fields)
  local args = {K_EVENTS, 'MAXLEN', '~', EVENTS_MAX, '*', 'type', kind, 'account', ACCOUNT_ID, 't', now_ms}
  for i = 1, #fields do args[#args + 1] = fields[i] end
  return args
end

-- Each event once per account and scope (window, month, lot, crossing). A
-- deferred one is checked again when written (two items may defer the same).
local function emit_once(note, kind, fields)
  if deferred_effects then
    if redis.call('HEXISTS', K_NOTES, note) == 0 then
      deferred_effects[#deferred_effects + 1] = {'n', note, emit_args(kind, fields)}
    end
  elseif redis.call('HSETNX', K_NOTES, note, now_ms) == 1 then
    redis.call('XADD', unpack(emit_args(kind, fields)))
  end
end

local function lots_text(taken)
  local parts = {}
  for i = 1, #taken, 3 do parts[#parts + 1] = taken[i] .. ':' .. taken[i + 1] end
  return table.concat(parts, ',')
end

-- Credits of each lot in open holds, as "<lot_id>|h" fields of the lotrem hash
-- ('|' is outside the id alphabet), so a revoke reads one field instead of
-- every open hold. taken: flat {lot_id, credits, lot_expires_ms} triples.
local function lot_hold_field(lot_id) return lot_id .. '|h' end
local function hold_lots(taken)
  for i = 1, #taken, 3 do redis.call('HINCRBY', K_LOTREM, lot_hold_field(taken[i]), taken[i + 1]) end
end
local function unhold_lots(taken)
  for i = 1, #taken, 3 do
    local field = lot_hold_field(taken[i])
    if tonumber(redis.call('HINCRBY', K_LOTREM, field, -tonumber(taken[i + 1]))) <= 0 then
      redis.call('HDEL', K_LOTREM, field)
    end
  end
end

-- Credits go back to the lot they came from. If that lot has expired or
-- been revoked in the meantime they expire or are revoked with it: such
-- credits are never spendable again. Returns (to lots, expired, revoked).
local function return_credits(taken)
  local to_lots, to_expired, to_revoked = 0, 0, 0
  for i = 1, #taken, 3 do
    local lot_id, credits, lot_expires_ms = taken[i], tonumber(taken[i + 1]), tonumber(taken[i + 2])
    local meta = lot_meta(lot_id)
    if meta.v == 1 then
      to_revoked = to_revoked + credits
      meta.vr = (meta.vr or 0) + credits
      redis.call('HSET', K_LOTS, lot_id, cjson.encode(meta))
    elseif lot_expires_ms <= now_ms then
      to_expired = to_expired + credits
      meta.x = (meta.x or 0) + credits
      redis.call('HSET', K_LOTS, lot_id, cjson.encode(meta))
    else
      redis.call('HINCRBY', K_LOTREM, lot_id, credits)
      redis.call('ZADD', K_LOTEXP, lot_score(lot_expires_ms, meta.k or 3), lot_id)
      to_lots = to_lots + credits
    end
  end
  incr('credits_expired', to_expired)
  incr('credits_revoked', to_revoked)
  return to_lots, to_expired, to_revoked
end

-- A limit's state now. limit = {id, kind, free, hours, shadow}; day and week
-- are the current windows {label, end_ms}. Returns used, when a unit frees
-- up, and the key a new use is counted under.
local function limit_state(product, limit, day, week)
  local scope = product .. '|' .. limit.id .. '|'
  if limit.kind == 'rolling' then
    local span_ms = limit.hours * HOUR_MS
    local uses = redis.call('ZRANGEBYSCORE', K_ROLLING, '(' .. (now_ms - span_ms), '+inf', 'WITHSCORES')
    local used, oldest_ms = 0, nil
    for i = 1, #uses, 2 do
      if string.sub(uses[i], 1, #scope) == scope then
        -- "<rid>" counts 1 (a job), "<rid>|<amount>" its amount (included usage).
        used = used + (tonumber(string.match(string.sub(uses[i], #scope + 1), '|(%d+)$')) or 1)
        local at_ms = tonumber(uses[i + 1])
        if oldest_ms == nil or at_ms < oldest_ms then oldest_ms = at_ms end
      end
    end
    return used, (oldest_ms or now_ms) + span_ms, 'z' .. scope
  end
  local window = limit.kind == 'week' and week or day
  local field = scope .. string.sub(limit.kind, 1, 1) .. window[1]
  return tonumber(redis.call('HGET', K_FREE, field) or '0'), window[2], 'h' .. field
end

-- Counts one use under a limit's key; returns what the reservation records.
-- usage: nil for a job (1 unit), else the included usage it takes (credits; 0 counts nothing).
local function take_free_unit(key, rid, usage)
  if string.sub(key, 1, 1) == 'z' then
    local member = string.sub(key, 2) .. rid
    if usage then member = member .. '|' .. usage end
    if usage ~= 0 then redis.call('ZADD', K_ROLLING, now_ms, member) end
    return 'z' .. member
  end
  if usage ~= 0 then redis.call('HINCRBY', K_FREE, string.sub(key, 2), usage or 1) end
  return key
end

-- A counter field `by` (default 1) lower, dropped at zero (a counter never goes below
-- zero, and a zero is no different from no field: nothing left behind).
local function decrement(key, field, by)
  by = by or 1
  if by <= 0 then return end
  local count = tonumber(redis.call('HGET', key, field) or '0')
  if count > by then
    redis.call('HINCRBY', key, field, -by)
  elseif count > 0 then
    redis.call('HDEL', key, field)
  end
end

-- usage: what each use counts (nil: 1, a job's unit).
local function return_free_units(taken, usage)
  for _, key in ipairs(taken) do
    local name = string.sub(key, 2)
    if string.sub(key, 1, 1) == 'z' then
      redis.call('ZREM', K_ROLLING, name)
    else
      decrement(K_FREE, name, usage)
    end
  end
end

-- Commit of an included-usage hold: each use goes from the estimate held (rec.fu) to the
-- actual `usage`, where the hold counted it: the rolling use keeps its time, a day or week
-- counter is the hold's own even if that window has rolled since (a counter already pruned
-- stays so: its window no longer decides anything). Rewrites rec.fw and rec.fu.
local function adjust_free_units(rec, usage)
  local delta = usage - rec.fu
  for i, key in ipairs(rec.fw) do
    local name = string.sub(key, 2)
    if string.sub(key, 1, 1) == 'z' then
      local member = string.gsub(name, '|%d+$', '') .. '|' .. usage
      local at_ms = redis.call('ZSCORE', K_ROLLING, name)
      if at_ms then
        redis.call('ZREM', K_ROLLING, name)
        if usage > 0 then redis.call('ZADD', K_ROLLING, at_ms, member) end
      end
      rec.fw[i] = 'z' .. member
    elseif delta < 0 then
      decrement(K_FREE, name, -delta)
    elseif delta > 0 and redis.call('HEXISTS', K_FREE, name) == 1 then
      redis.call('HINCRBY', K_FREE, name, delta)
    end
  end
  rec.fu = usage
end

-- Never sends a zero: Lua formats -0 as "-0", which HINCRBY rejects, and a
-- script that errors keeps the writes it already made (no rollback).
local function unspend(month, credits)
  if month and month ~= '' and credits > 0 then
    local take = math.min(tonumber(redis.call('HGET', K_SPEND, month) or '0'), credits)
    if take > 0 then redis.call('HINCRBY', K_SPEND, month, -take) end
  end
end

-- Ends a hold: it leaves the hold index and the in-flight count, and its
-- record becomes prunable.
local function resolve(rid, rec, state)
  rec.s = state
  rec.r = now_ms
  -- The stored decision (the record's largest field) replays only a live hold: a resolved one
  -- answers with its state. Dropped, the record kept for retries is about half the size.
  rec.d = nil
  save_record(rid, rec)
  redis.call('ZREM', K_HOLDS, rid)
  redis.call('ZADD', K_RESDONE, now_ms, rid)
  decrement(K_INFLIGHT, rec.p)
end

-- Gives a whole hold back (Release and expiry). Returns the outbox fields and
-- deltas of the movement.
-- A free hold with cameo fees (rec.cf) gives back both its free unit and the fees' credits.
local function refund_hold(rec)
  local fields, deltas = {}, {}
  if rec.f == 'free' then
    return_free_units(rec.fw, rec.fu)
    fields, deltas = {'free', 1, 'free_units', cjson.encode(rec.fw)}, {f = -(rec.fu or 1)}
    if rec.fu then
      fields[#fields + 1] = 'usage'
      fields[#fields + 1] = rec.fu
    end
    if (rec.c or 0) == 0 then return fields, deltas end
  end
  incr('credits_held', -rec.c)
  unspend(rec.m, rec.c)
  unhold_lots(rec.l)
  local to_lots, to_expired, to_revoked = return_credits(rec.l)
  local moved = {'credits', rec.c, 'to_lots', to_lots, 'to_expired', to_expired, 'to_revoked', to_revoked,
                 'lots', lots_text(rec.l)}
  for i = 1, #moved do fields[#fields + 1] = moved[i] end
  if (rec.cf or 0) > 0 then
    fields[#fields + 1] = 'fees'
    fields[#fields + 1] = rec.cf
  end
  deltas.h, deltas.x, deltas.v = -rec.c, to_expired, to_revoked
  return fields, deltas
end

-- Royalties are recorded as "<cameo>|<owner>|<credits>,..." ('|' and ',' are outside the id
-- alphabet). This one with every amount negated: a refund gives the royalty back.
local function negate_royalties(text)
  local parts = {}
  for cameo, owner, credits in string.gmatch(text or '', '([^,|]+)|([^,|]+)|(%d+)') do
    parts[#parts + 1] = cameo .. '|' .. owner .. '|-' .. credits
  end
  return table.concat(parts, ',')
end

local function hold_fields(rid, rec, extra)
  local fields = {'rid', rid, 'product', rec.p, 'funding', rec.f, 'pv', rec.pv or ''}
  for i = 1, #extra do fields[#fields + 1] = extra[i] end
  return fields
end

local function expire_hold(rid, rec)
  local moved, deltas = refund_hold(rec)
  resolve(rid, rec, 'expired')
  ledger('expire', deltas, hold_fields(rid, rec, moved))
end

-- Turns a live hold into spend of `charge` credits (at most the hold; 0 for a
-- free hold, whose unit stays spent). The unused part goes back to the lots
-- taken last, which expire latest, so the credits spent are the ones that
-- expire soonest. `extra`: more outbox fields; `free_delta`: the included usage the commit
-- adjusts (actual - held, see adjust_free_units), else nil. `over` (overage:
-- draw, charge = the whole hold): {drawn = credits taken from the lots past the hold,
-- taken = their {lot_id, credits, expires_ms} triples, debt = credits owed past them}, all
-- spent on top of the hold; the record keeps the lots drawn with the hold's (a refund gives
-- them back). Returns the credits returned.
local function commit_hold(rid, rec, charge, extra, free_delta, over)
  local refund = rec.c - charge
  local back, kept = {}, {}
  for i = #rec.l - 2, 1, -3 do
    local lot_id, credits, lot_expires_ms = rec.l[i], tonumber(rec.l[i + 1]), rec.l[i + 2]
    local give = math.min(credits, refund)
    if give > 0 then
      back[#back + 1] = lot_id
      back[#back + 1] = give
      back[#back + 1] = lot_expires_ms
      refund = refund - give
    end
    if credits - give > 0 then
      table.insert(kept, 1, lot_expires_ms)
      table.insert(kept, 1, credits - give)
      table.insert(kept, 1, lot_id)
    end
  end
  unhold_lots(rec.l)
  local to_lots, to_expired, to_revoked = return_credits(back)
  local past_hold, debt = over and (over.drawn + over.debt) or 0, over and over.debt or 0
  incr('credits_held', -rec.c)
  incr('credits_spent', charge + past_hold)
  incr('debt', debt)
  unspend(rec.m, rec.c - charge)
  local lots = lots_text(kept)
  for i = 1, over and #over.taken or 0 do kept[#kept + 1] = over.taken[i] end
  rec.l = kept
  rec.ch, rec.rf = charge + past_hold, rec.c - charge
  resolve(rid, rec, 'committed')
  local fields = {'credits', charge + past_hold, 'free', rec.f == 'free' and 1 or 0, 'returned', rec.c - charge,
                  'to_lots', to_lots, 'to_expired', to_expired, 'to_revoked', to_revoked, 'lots', lots}
  for i = 1, #extra do fields[#fields + 1] = extra[i] end
  -- A free hold's unit stays spent: nothing moves (its rec.c and charge are 0); included usage
  -- moves by what the actual usage differs from the estimate.
  ledger('commit', {h = -rec.c, s = charge + past_hold, x = to_expired, v = to_revoked, d = debt, f = free_delta},
         hold_fields(rid, rec, fields))
  return rec.c - charge
end

-- A hold past its TTL is settled before anything else looks at it, so
-- Commit, Release and Extend all see EXPIRED before any sweep ran.
local function settle_if_due(rid, rec)
  if rec.s == 'held' and rec.e <= now_ms then expire_hold(rid, rec) end
end

local function load_settled_record(rid)
  local rec = load_record(rid)
  if rec then settle_if_due(rid, rec) end
  return rec
end

-- Whether a sorted set's lowest score is at or below max_score. Nothing is due
-- on most calls, and this look costs a fraction of the range query it saves.
local function head_due(key, max_score)
  local head = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
  return head[2] ~= nil and tonumber(head[2]) <= max_score
end

local function expire_lots()
  if not head_due(K_LOTEXP, expired_score_max()) then return end
  local ids = redis.call('ZRANGEBYSCORE', K_LOTEXP, '-inf', expired_score_max(), 'LIMIT', 0, EXPIRE_BATCH)
  for _, lot_id in ipairs(ids) do
    local left = tonumber(redis.call('HGET', K_LOTREM, lot_id) or '0')
    redis.call('ZREM', K_LOTEXP, lot_id)
    redis.call('HDEL', K_NOTES, 'lot_expiring:' .. lot_id)
    if left > 0 then
      redis.call('HSET', K_LOTREM, lot_id, 0)
      local meta = lot_meta(lot_id)
      meta.x = (meta.x or 0) + left
      redis.call('HSET', K_LOTS, lot_id, cjson.encode(meta))
      incr('credits_expired', left)
      ledger('lot_expire', {x = left}, {'pid', lot_id, 'credits', left})
    end
  end
end

local function expire_holds()
  if not head_due(K_HOLDS, now_ms) then return 0 end
  local rids = redis.call('ZRANGEBYSCORE', K_HOLDS, '-inf', now_ms, 'LIMIT', 0, EXPIRE_BATCH)
  for _, rid in ipairs(rids) do
    local rec = load_record(rid)
    if rec then expire_hold(rid, rec) else redis.call('ZREM', K_HOLDS, rid) end
  end
  return #rids
end

-- Resolved records are kept RETENTION_MS for idempotent retries, and at most
-- MAX_RECORDS of them, then dropped oldest first, at most `batch` per call.
-- Each call resolves at most one reservation, so a batch above one keeps the
-- count at its bound. Returns the records dropped.
local function prune_records(batch)
  local over = redis.call('ZCARD', K_RESDONE) - MAX_RECORDS
  if over <= 0 and not head_due(K_RESDONE, now_ms - RETENTION_MS) then return 0 end
  local due = math.max(over, redis.call('ZCOUNT', K_RESDONE, '-inf', now_ms - RETENTION_MS))
  local n = math.min(due, batch)
  local rids = redis.call('ZRANGE', K_RESDONE, 0, n - 1)
  redis.call('HDEL', K_RES, unpack(rids))
  redis.call('ZREMRANGEBYRANK', K_RESDONE, 0, n - 1)
  return n
end

-- Lots and holds past their expiry first, so nothing below sees them.
local function sweep()
  expire_lots()
  local expired = expire_holds()
  prune_records(PRUNE_BATCH)
  return expired
end

-- Unexpired lots with credits left, in spending order: flat
-- {lot_id, left, expires_ms, ...} and their total. Filters by score itself:
-- lazy expiry settles at most EXPIRE_BATCH lots a call, and an expired lot
-- must never be spendable whether or not it has been settled yet.
local function live_lots()
  local flat = redis.call('ZRANGEBYSCORE', K_LOTEXP, '(' .. expired_score_max(), '+inf', 'WITHSCORES')
  local lots, total = {}, 0
  for i = 1, #flat, 2 do
    local lot_id = flat[i]
    local left = tonumber(redis.call('HGET', K_LOTREM, lot_id) or '0')
    if left > 0 then
      lots[#lots + 1] = lot_id
      lots[#lots + 1] = left
      lots[#lots + 1] = score_expiry(flat[i + 1])
      total = total + left
    end
  end
  return lots, total
end

-- Takes up to `amount` credits out of `lots` (live_lots' flat triples, in their
-- spending order: soonest expiry first). Returns the {lot_id, credits,
-- expires_ms} triples taken and their total.
local function take_from_lots(lots, amount)
  local taken, need = {}, amount
  for i = 1, #lots, 3 do
    if need == 0 then break end
    local lot_id, left = lots[i], lots[i + 1]
    local take = math.min(left, need)
    redis.call('HINCRBY', K_LOTREM, lot_id, -take)
    if take == left then redis.call('ZREM', K_LOTEXP, lot_id) end
    taken[#taken + 1] = lot_id
    taken[#taken + 1] = take
    taken[#taken + 1] = lots[i + 2]
    need = need - take
  end
  return taken, amount - need
end

-- Open debt (the acct hash's `debt`, read by the caller before its first write) is
-- paid before anything else spends the credits: from the live lots, soonest
-- expiry first, as one debt_repay entry (pid: the grant that brought them, when
-- one did; debt: what is left owed). Returns the debt left.
local function repay_debt(debt, pid)
  if debt <= 0 then return debt end
  local lots, total = live_lots()
  if total <= 0 then return debt end
  local taken, paid = take_from_lots(lots, math.min(debt, total))
  redis.call('HINCRBY', K_ACCT, 'debt', -paid)
  local fields = {'credits', paid, 'debt', debt - paid, 'lots', lots_text(taken)}
  if pid then
    fields[#fields + 1] = 'pid'
    fields[#fields + 1] = pid
  end
  ledger('debt_repay', {d = -paid}, fields)
  return debt - paid
end

-- Counters and notes of windows older than the oldest candidate can no
-- longer matter (labels are YYYYMMDD / YYYYMM, so string order is date
-- order); a refund to a pruned counter is a no-op.
local function prune_old_windows(oldest_day, oldest_week, oldest_month)
  for _, field in ipairs(redis.call('HKEYS', K_FREE)) do
    local kind, label = string.match(field, '|([dw])(%d+)$')
    if label and label < (kind == 'd' and oldest_day or oldest_week) then redis.call('HDEL', K_FREE, field) end
  end
  redis.call('ZREMRANGEBYSCORE', K_ROLLING, '-inf', now_ms - MAX_ROLLING_MS)
  for _, month in ipairs(redis.call('HKEYS', K_SPEND)) do
    if month < oldest_month then redis.call('HDEL', K_SPEND, month) end
  end
  for _, note in ipairs(redis.call('HKEYS', K_NOTES)) do
    local label = string.match(note, '|(%d+)$')
    if label and ((#label == 8 and label < oldest_day) or (#label == 6 and label < oldest_month)) then
      redis.call('HDEL', K_NOTES, note)
    end
  end
end

local function account(default_plan)
  local v = redis.call('HMGET', K_ACCT, 'plan', 'tz')
  return v[1] or default_plan, v[2] or 'UTC'
end

-- The window containing now among the ones the sidecar computed from its
-- own (possibly skewed) clock; nil when its clock is off by over a day.
-- rows: {label, start_ms, end_ms}.
local function pick_window(rows)
  for _, row in ipairs(rows) do
    if tonumber(row[2]) <= now_ms and now_ms < tonumber(row[3]) then return row[1], tonumber(row[3]) end
  end
  return nil, nil
end
-- pick_window over the {label, start_ms, end_ms} rows of the block at ARGV index `at`.
local function window_at(at)
  for i = 1, tonumber(ARGV[at]) do
    local first = at + 1 + (i - 1) * 3
    if tonumber(ARGV[first + 1]) <= now_ms and now_ms < tonumber(ARGV[first + 2]) then
      return ARGV[first], tonumber(ARGV[first + 2])
    end
  end
  return nil, nil
end

local function totals_table()
  local v = redis.call('HMGET', K_ACCT, unpack(TOTALS))
  local t = {}
  for i, name in ipairs(TOTALS) do t[name] = tonumber(v[i] or '0') end
  return t
end
