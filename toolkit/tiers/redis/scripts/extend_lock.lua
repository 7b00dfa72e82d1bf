-- Set a new TTL on a lock only if the caller still owns it.
-- KEYS[1]  lock key
-- ARGV[1]  owner token
-- ARGV[2]  new TTL in milliseconds (counted from now)
-- returns  1 when extended, 0 when the lock is not held by that token
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
