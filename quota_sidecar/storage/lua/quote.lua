-- Quote: what CheckAndReserve would answer now, held nowhere. reserve_one
-- (_reserve.lua) decides exactly as for reserve.lua, with the same arguments,
-- in dry-run mode: the reply is the decision's, and nothing of the decision is
-- written (no hold, record, outbox entry, usage event or note). Lazy expiry
-- still settles what is past due first, as every decision does: the answer
-- must be the one CheckAndReserve would give on the state it would see.
return reserve_one(false, true)
