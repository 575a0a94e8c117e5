-- ExtendReservation: push a live hold's expiry to now + ttl. Never shortens.
-- Times are in milliseconds.
local rid    = next_arg()
local ttl_ms = tonumber(next_arg())  -- 0: the lifetime the hold was made with

local rec = load_settled_record(rid)
if not rec then return fail('RESERVATION_NOT_FOUND') end
local refusal = RESOLVED_REFUSALS[rec.s]
if refusal then return fail(refusal, {resolved_ms = rec.r}) end

if ttl_ms == 0 then ttl_ms = rec.ttl end
local expires_ms = math.max(rec.e, now_ms + ttl_ms)
if expires_ms ~= rec.e then
  rec.e = expires_ms
  save_record(rid, rec)
  redis.call('ZADD', K_HOLDS, expires_ms, rid)
end
return reply({expires_ms = expires_ms, now_ms = now_ms})
