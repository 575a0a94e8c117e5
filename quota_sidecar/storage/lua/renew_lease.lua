-- Renews a lease (see RedisStore.try_lock) only while its holder still owns it:
-- a holder whose lease lapsed and was taken must not take it back.
-- Stands alone (no _prelude.lua): the lease key is no account's.
-- KEYS[1] the lease key. ARGV: 1 owner, 2 new lifetime in ms. Returns 1 when renewed.
local lease_key, owner, ttl_ms = KEYS[1], ARGV[1], ARGV[2]
if redis.call('GET', lease_key) ~= owner then return 0 end
redis.call('PEXPIRE', lease_key, ttl_ms)
return 1
