-- SetAccount: plan, time zone, monthly spend cap, auto top-up, per-product
-- limit overrides. An empty
-- argument leaves the setting unchanged. The engine has already checked
-- that the plan and pack exist and the zone is valid. Credits are integers.
local plan         = next_arg()
local tz           = next_arg()
local default_plan = next_arg()
local cap          = next_arg()  -- credits per month; '0' = none
local topup_on     = next_arg()  -- '1' / '0'
local topup_thr    = next_arg()
local topup_pack   = next_arg()
local overrides    = next_block(2)  -- {product, JSON {limits, max_concurrent} or '' to remove}

-- The settings that matter to money, as they are before this call (read before any write).
local SETTINGS = {'plan', 'tz', 'cap', 'at_on', 'at_thr', 'at_pack'}
local DEFAULTS = {default_plan, 'UTC', '0', '0', '0', ''}
local function settings_now()
  local v = redis.call('HMGET', K_ACCT, unpack(SETTINGS))
  for i = 1, #SETTINGS do v[i] = v[i] or DEFAULTS[i] end
  return v
end
local before = settings_now()

local changes = {}
local function set(field, value)
  if value ~= '' then
    changes[#changes + 1] = field
    changes[#changes + 1] = value
  end
end
set('plan', plan)
set('tz', tz)
set('cap', cap)
-- An auto top-up is set whole (topup_on '' = not given): an empty pack clears the stored one.
if topup_on ~= '' then
  set('at_on', topup_on)
  set('at_thr', topup_thr)
  if topup_pack == '' then redis.call('HDEL', K_ACCT, 'at_pack') else set('at_pack', topup_pack) end
end
for _, o in ipairs(overrides) do
  if o[2] == '' then
    redis.call('HDEL', K_ACCT, 'ovr|' .. o[1])
  else
    changes[#changes + 1] = 'ovr|' .. o[1]
    changes[#changes + 1] = o[2]
  end
end
if #changes > 0 then redis.call('HSET', K_ACCT, unpack(changes)) end
-- The books learn of a plan, zone, spend cap or auto top-up that changed: the new
-- value of each (the old one is in an earlier entry, or the default). Nothing moves.
local after, changed = settings_now(), {}
for i = 1, #SETTINGS do
  if after[i] ~= before[i] then
    changed[#changed + 1] = SETTINGS[i]
    changed[#changed + 1] = after[i]
  end
end
if #changed > 0 then ledger('account', {}, changed) end
local current = {}
local fields = redis.call('HGETALL', K_ACCT)
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 4) == 'ovr|' then current[#current + 1] = {string.sub(fields[i], 5), fields[i + 1]} end
end

local current_plan, current_tz = account(default_plan)
local v = redis.call('HMGET', K_ACCT, 'cap', 'at_on', 'at_thr', 'at_pack')
return reply({plan = current_plan, tz = current_tz, cap = tonumber(v[1] or '0'), at_on = v[2] or '0',
              at_thr = tonumber(v[3] or '0'), at_pack = v[4] or '', overrides = current})
