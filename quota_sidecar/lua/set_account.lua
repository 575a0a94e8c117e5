-- SetAccount: plan and/or time zone; an empty argument leaves it unchanged.
-- The engine has already checked that the plan exists and the zone is valid.
local plan         = ARGV[1]
local tz           = ARGV[2]
local default_plan = ARGV[3]

if plan ~= '' then redis.call('HSET', K_ACCT, 'plan', plan) end
if tz ~= '' then redis.call('HSET', K_ACCT, 'tz', tz) end
local current_plan, current_tz = account(default_plan)
return reply({plan = current_plan, tz = current_tz})
