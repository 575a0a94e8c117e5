-- Sweep: the background sweeper's lazy expiry for an account nobody is
-- calling: expired lots and holds are settled exactly as a decision would.
-- Times are in milliseconds.
local pinned_ms    = tonumber(ARGV[1])
local retention_ms = tonumber(ARGV[2])

local now_ms = clock_ms(pinned_ms)
return reply({expired = sweep(now_ms, retention_ms), now_ms = now_ms})
