-- CheckAndReserveBatch with all_or_nothing: the items of ONE account, decided
-- in one atomic step. Either every item is allowed (and held), or nothing of
-- the batch is held.
--
-- Each item is decided by reserve_one() (_reserve.lua), in order, each seeing
-- the holds of the ones before it. If one is not allowed (a denial or an
-- error reply), the holds the batch made are given back before the script
-- ends: Redis runs a script alone, so no other call ever sees them. To leave no
-- trace of them, each item's effects (outbox entries, usage events) are
-- deferred (defer_effects, _prelude.lua) and written only for what stands:
-- every item's when the batch is allowed, only the refused items' (their
-- purchase_required events, say) when it is not. An undone hold's record is
-- deleted, so a retry of the batch decides again, as after a denial.
--
-- A runtime error while deciding an item (corrupt data, a bug) is caught: the
-- items held before it are undone, nothing of the batch is written, and the
-- error is raised again. reserve_one reads everything before its first write,
-- so the failing item itself wrote nothing.
--
-- Lazy expiry (and the repayment of open debt from the lots) runs once, for real, before the items: what it settles stays
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
local debt = tonumber(redis.call('HGET', K_ACCT, 'debt') or '0')
-- Before any write, as in reserve.lua: the sidecar retries with our zone.
if tz ~= expected_tz then return fail('TZ_MISMATCH', {tz = tz}) end
sweep()
repay_debt(debt)  -- for real too, like lazy expiry: never undone with the batch

-- Exactly what reserve_one wrote for a new hold, in reverse (its outbox entry was
-- deferred, so never written, and took no sequence number): the free units
-- or credits (to the same lots), the spend month, the held total, the record,
-- the hold index and the in-flight count.
local function undo(rid)
  local rec = load_record(rid)
  refund_hold(rec)
  redis.call('HDEL', K_RES, rid)
  redis.call('ZREM', K_HOLDS, rid)
  decrement(K_INFLIGHT, rec.p)
end

local function new_hold(r) return not r.error and r.allowed == 1 and r.replayed ~= 1 end

local results, rids, effects, refused = {}, {}, {}, false
for i = 1, count do
  rids[i] = ARGV[cursor + 1]  -- reserve_one's first argument is the reservation id
  defer_effects()
  local ok, answer = pcall(reserve_one, true)
  effects[i] = take_effects()
  if not ok then
    for j = i - 1, 1, -1 do
      if new_hold(results[j]) then undo(rids[j]) end
    end
    error(answer)
  end
  local r = cjson.decode(answer)
  results[i] = r
  if r.error or r.allowed ~= 1 then refused = true end
end

if refused then
  for i = count, 1, -1 do
    local r = results[i]
    if new_hold(r) then
      undo(rids[i])
      r.aborted = 1
      effects[i] = {}
    end
  end
end
for i = 1, count do write_effects(effects[i]) end
return reply({results = results})
