-- RefundJob: a committed job's cost goes back (a generation that failed
-- after commit): credits to the lots they were spent from (expired or
-- revoked lots keep them), a free unit to its window. At most once per
-- reservation; a repeat replays. Credits are integers.
--
-- A job whose overage was drawn (overage: draw) gives back its hold's and its
-- drawn credits to their lots, and cancels what is still open of the debt it
-- opened (dd < 0). What the account already repaid of that debt is not given
-- back: which lots paid it is not recorded per job (a compensation grant can).
-- The refund's credits are what it gave back, lots and cancelled debt.
local rid    = next_arg()
local reason = next_arg()

local rec = load_settled_record(rid)
if not rec then return fail('RESERVATION_NOT_FOUND') end
if rec.s ~= 'committed' then return fail('NOT_COMMITTED', {state = rec.s}) end

local free = (rec.f == 'free') and 1 or 0
if rec.rj ~= nil then
  local _, balance = live_lots()
  return reply({refunded = rec.rj, free_refunded = free, balance = balance, replayed = 1})
end

local debt = tonumber(redis.call('HGET', K_ACCT, 'debt') or '0')
sweep()
local fields, deltas = {}, {}
if free == 1 then
  -- Included usage (rec.fu): the actual usage the commit charged goes back to its windows.
  return_free_units(rec.fw, rec.fu)
  rec.rj = 0
  fields, deltas = {'free', 1, 'free_units', cjson.encode(rec.fw)}, {f = -(rec.fu or 1)}
  if rec.fu then
    fields[#fields + 1] = 'usage'
    fields[#fields + 1] = rec.fu
  end
end
-- Credits charged (a credits job's, or a free job's cameo fees) go back; with them the royalty.
if free == 0 or (rec.ch or 0) > 0 then
  local cancelled = math.min(rec.db or 0, debt)
  local refunded = rec.ch - ((rec.db or 0) - cancelled)
  local to_lots, to_expired, to_revoked = return_credits(rec.l)
  incr('credits_refunded', refunded)
  incr('debt', -cancelled)
  unspend(rec.m, refunded)
  local moved = {'credits', refunded, 'to_lots', to_lots, 'to_expired', to_expired, 'to_revoked', to_revoked,
                 'lots', lots_text(rec.l)}
  for i = 1, #moved do fields[#fields + 1] = moved[i] end
  deltas.r, deltas.x, deltas.v, deltas.d = refunded, to_expired, to_revoked, -cancelled
  if cancelled > 0 then
    fields[#fields + 1] = 'debt_cancelled'
    fields[#fields + 1] = cancelled
  end
  rec.rj = refunded
  rec.l = {}
  if (rec.cf or 0) > 0 then
    for _, v in ipairs({'fees', rec.cf, 'roy', negate_royalties(rec.cm)}) do fields[#fields + 1] = v end
  end
end
save_record(rid, rec)
fields[#fields + 1] = 'reason'
fields[#fields + 1] = reason
ledger('refund', deltas, hold_fields(rid, rec, fields))
local _, balance = live_lots()
return reply({refunded = rec.rj, free_refunded = free, balance = balance, replayed = 0})
