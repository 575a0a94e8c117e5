-- CheckAndReserveBatch with all_or_nothing: the items of ONE account, decided
-- in one atomic step. Either every item is allowed (and held), or nothing of
-- the batch is held.
--
-- Each item is decided by reserve_one() (_reserve.lua), in order, each seeing
-- the holds of the ones before it. If one is not allowed (a denial or an
-- error), the holds the batch made are given back before the script ends:
-- Redis runs a script alone, so no other call ever sees them. To leave no
-- trace of them, the items' ledger entries and usage events are held back
-- while deciding and written only for what stands: every item's when the
-- batch is allowed, only the refused items' (their purchase_required events,
-- say) when it is not. An undone hold's record is deleted, so a retry of the
-- batch decides again, as after a denial.
--
-- Lazy expiry runs once, for real, before the items: what it settles stays
-- settled whatever the batch's fate (reserve_one's own sweep is skipped).
--
-- ARGV after the header: the time zone the sidecar assumed, the default
-- plan, the item count, then each item's arguments as reserve.lua reads them
-- (their time zone is the one above). Reply: {results = [...]}, each an
-- item's decision or error as reserve.lua would reply it, with aborted = 1
-- on an allowed item whose hold was undone. Replays of earlier reservations
-- are never undone (the earlier call made them).
local expected_tz   = next_arg()
local default_plan  = next_arg()
local count         = tonumber(next_arg())

local _, tz = account(default_plan)
-- Before any write, as in reserve.lua: the sidecar retries with our zone.
if tz ~= expected_tz then return fail('TZ_MISMATCH', {tz = tz}) end
sweep()

local real = {ledger = ledger, emit_once = emit_once, sweep = sweep}
-- The current item's deferred writes: {'x', XADD args} or {'n', note, XADD args}. A note
-- deferred twice in one batch is written once: write() checks it again (HSETNX).
local held_back = nil
ledger = function(kind, fields) held_back[#held_back + 1] = {'x', ledger_args(kind, fields)} end
emit_once = function(note, kind, fields)
  if redis.call('HEXISTS', K_NOTES, note) == 0 then held_back[#held_back + 1] = {'n', note, emit_args(kind, fields)} end
end
sweep = function() return 0 end

local results, rids, writes, refused = {}, {}, {}, false
for i = 1, count do
  rids[i] = ARGV[cursor + 1]  -- reserve_one's first argument is the reservation id
  held_back = {}
  local r = cjson.decode(reserve_one())
  results[i], writes[i] = r, held_back
  if r.error or r.allowed ~= 1 then refused = true end
end
ledger, emit_once, sweep = real.ledger, real.emit_once, real.sweep

local function write(deferred)
  for _, w in ipairs(deferred) do
    if w[1] == 'x' then
      redis.call('XADD', unpack(w[2]))
    elseif redis.call('HSETNX', K_NOTES, w[2], now_ms) == 1 then
      redis.call('XADD', unpack(w[3]))
    end
  end
end

-- Exactly what reserve_one wrote for a new hold, in reverse: the free units
-- or credits (to the same lots), the spend month, the held total, the record,
-- the hold index and the in-flight count.
local function undo(rid)
  local rec = load_record(rid)
  refund_hold(rec)
  redis.call('HDEL', K_RES, rid)
  redis.call('ZREM', K_HOLDS, rid)
  if tonumber(redis.call('HGET', K_INFLIGHT, rec.p) or '0') > 0 then redis.call('HINCRBY', K_INFLIGHT, rec.p, -1) end
end

if refused then
  for i = count, 1, -1 do
    local r = results[i]
    if not r.error and r.allowed == 1 and r.replayed ~= 1 then
      undo(rids[i])
      r.aborted = 1
      writes[i] = {}
    end
  end
end
for i = 1, count do write(writes[i]) end
return reply({results = results})
