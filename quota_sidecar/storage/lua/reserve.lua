-- CheckAndReserve: the whole decision in one atomic step (see _reserve.lua,
-- prepended with _prelude.lua when the script is registered).
return reserve_one(false)
