-- Shared helpers of every quota-sidecar script.
--
-- The store prepends this file to each operation script (reserve.lua,
-- commit.lua, ...) before registering it, so every operation is still ONE
-- script run as ONE EVALSHA. Nothing here runs on its own.
--
-- Units: times are integer milliseconds since the Unix epoch; credits and
-- free units are integers. Every key is passed in KEYS[], all under the
-- hash tag of the account's bucket, so each script touches exactly one
-- cluster slot.
--
-- KEYS (same order in every script):
--   1 acct     HASH  plan, tz, credits_granted, credits_spent, credits_expired
--   2 free     HASH  "<product>|<YYYYMMDD>" -> free units held or spent in that window
--   3 lots     HASH  lot_id -> JSON {g = credits granted, e = expires_ms, t = granted_ms}
--   4 lotrem   HASH  lot_id -> credits left in the lot
--   5 lotexp   ZSET  lot_id scored by expires_ms; only unexpired lots with credits left
--   6 holds    ZSET  reservation_id scored by expires_ms; only unresolved holds
--   7 res      HASH  reservation_id -> JSON reservation record (see new_record)
--   8 resdone  ZSET  reservation_id scored by resolved_ms; for pruning old records
--
-- A reservation record: s = state ("held", "committed", "released",
-- "expired"), p = product, fp = request fingerprint, f = funding ("free" or
-- "credits"), ff = free field, c = credits held, l = flat list of
-- {lot_id, credits, lot_expires_ms} triples the credits came from,
-- cr = created_ms, e = expires_ms, ttl = ttl_ms, ch = credits charged,
-- rf = credits refunded, r = resolved_ms, d = the decision to replay.

-- Scripts call TIME and then write; effects replication (the default since
-- Redis 5, the only mode in 7) keeps replicas exact. Explicit for Redis 6.2.
if redis.replicate_commands then redis.replicate_commands() end

local K_ACCT, K_FREE, K_LOTS, K_LOTREM = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_LOTEXP, K_HOLDS, K_RES, K_RESDONE = KEYS[5], KEYS[6], KEYS[7], KEYS[8]

-- Bounds the work lazy expiry does in one call; the rest waits for the next.
local EXPIRE_BATCH = 64
local PRUNE_BATCH = 16

-- The one clock every sidecar agrees on is Redis' own. A non-zero pinned
-- value is the engine's injected clock (tests, deterministic replays).
local function clock_ms(pinned_ms)
  if pinned_ms > 0 then return pinned_ms end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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

-- Credits go back to the lot they came from; if that lot has expired in
-- the meantime they expire with it (an expired lot is never spendable).
local function return_credits(lots_taken, now_ms)
  for i = 1, #lots_taken, 3 do
    local lot_id = lots_taken[i]
    local credits = tonumber(lots_taken[i + 1])
    local lot_expires_ms = tonumber(lots_taken[i + 2])
    if lot_expires_ms <= now_ms then
      redis.call('HINCRBY', K_ACCT, 'credits_expired', credits)
    else
      redis.call('HINCRBY', K_LOTREM, lot_id, credits)
      redis.call('ZADD', K_LOTEXP, lot_expires_ms, lot_id)
    end
  end
end

local function return_free_unit(free_field)
  local used = tonumber(redis.call('HGET', K_FREE, free_field) or '0')
  if used > 0 then redis.call('HINCRBY', K_FREE, free_field, -1) end
end

-- Ends a hold: it leaves the hold index and its record becomes prunable.
local function resolve(rid, rec, state, now_ms)
  rec.s = state
  rec.r = now_ms
  save_record(rid, rec)
  redis.call('ZREM', K_HOLDS, rid)
  redis.call('ZADD', K_RESDONE, now_ms, rid)
end

local function refund_hold(rec, now_ms)
  if rec.f == 'free' then
    return_free_unit(rec.ff)
  else
    return_credits(rec.l, now_ms)
  end
end

-- A hold past its TTL is settled before anything else looks at it, so
-- Commit, Release and Extend all see EXPIRED before any sweep ran.
local function settle_if_due(rid, rec, now_ms)
  if rec.s == 'held' and rec.e <= now_ms then
    refund_hold(rec, now_ms)
    resolve(rid, rec, 'expired', now_ms)
  end
end

local function load_settled_record(rid, now_ms)
  local rec = load_record(rid)
  if rec then settle_if_due(rid, rec, now_ms) end
  return rec
end

local function expire_lots(now_ms)
  local ids = redis.call('ZRANGEBYSCORE', K_LOTEXP, '-inf', now_ms, 'LIMIT', 0, EXPIRE_BATCH)
  for _, lot_id in ipairs(ids) do
    local left = tonumber(redis.call('HGET', K_LOTREM, lot_id) or '0')
    if left > 0 then
      redis.call('HSET', K_LOTREM, lot_id, 0)
      redis.call('HINCRBY', K_ACCT, 'credits_expired', left)
    end
    redis.call('ZREM', K_LOTEXP, lot_id)
  end
end

-- A hold whose TTL has passed is refunded exactly like a Release.
local function expire_holds(now_ms)
  local rids = redis.call('ZRANGEBYSCORE', K_HOLDS, '-inf', now_ms, 'LIMIT', 0, EXPIRE_BATCH)
  for _, rid in ipairs(rids) do
    local rec = load_record(rid)
    if rec then
      refund_hold(rec, now_ms)
      resolve(rid, rec, 'expired', now_ms)
    else
      redis.call('ZREM', K_HOLDS, rid)
    end
  end
  return #rids
end

-- Resolved records are kept retention_ms for idempotent retries, then dropped.
local function prune_records(now_ms, retention_ms)
  local rids = redis.call('ZRANGEBYSCORE', K_RESDONE, '-inf', now_ms - retention_ms, 'LIMIT', 0, PRUNE_BATCH)
  for _, rid in ipairs(rids) do
    redis.call('HDEL', K_RES, rid)
    redis.call('ZREM', K_RESDONE, rid)
  end
end

-- Lots and holds past their expiry first, so nothing below sees them.
local function sweep(now_ms, retention_ms)
  expire_lots(now_ms)
  local expired = expire_holds(now_ms)
  prune_records(now_ms, retention_ms)
  return expired
end

-- Unexpired lots with credits left, soonest expiry first: flat
-- {lot_id, left, expires_ms, ...} and their total. Filters by expiry itself:
-- lazy expiry settles at most EXPIRE_BATCH lots a call, and an expired lot
-- must never be spendable whether or not it has been settled yet.
local function live_lots(now_ms)
  local flat = redis.call('ZRANGEBYSCORE', K_LOTEXP, '(' .. now_ms, '+inf', 'WITHSCORES')
  local lots, total = {}, 0
  for i = 1, #flat, 2 do
    local lot_id = flat[i]
    local left = tonumber(redis.call('HGET', K_LOTREM, lot_id) or '0')
    if left > 0 then
      lots[#lots + 1] = lot_id
      lots[#lots + 1] = left
      lots[#lots + 1] = tonumber(flat[i + 1])
      total = total + left
    end
  end
  return lots, total
end

-- Counters of windows older than oldest_label (YYYYMMDD, so string order is
-- date order) can no longer matter: a refund to a pruned one is a no-op.
local function prune_free_windows(oldest_label)
  local fields = redis.call('HKEYS', K_FREE)
  for _, field in ipairs(fields) do
    local label = string.match(field, '|(%d+)$')
    if label and label < oldest_label then redis.call('HDEL', K_FREE, field) end
  end
end

local function account(default_plan)
  local v = redis.call('HMGET', K_ACCT, 'plan', 'tz')
  return v[1] or default_plan, v[2] or 'UTC'
end

-- The window containing now among the ones the sidecar computed from its
-- own (possibly skewed) clock; nil when its clock is off by over a day.
-- args: ARGV index of the count, followed by (label, start_ms, end_ms) triples.
local function pick_window(first, now_ms)
  local n = tonumber(ARGV[first])
  for i = 0, n - 1 do
    local base = first + 1 + 3 * i
    local start_ms, end_ms = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
    if start_ms <= now_ms and now_ms < end_ms then
      return ARGV[base], end_ms
    end
  end
  return nil, nil
end
