-- Take a lock if it is free and hand out the next fencing token.
-- KEYS[1]  lock key (value: owner token)
-- KEYS[2]  fencing counter of the lock
-- ARGV[1]  owner token (random)
-- ARGV[2]  lock TTL in milliseconds
-- ARGV[3]  lowest fencing token allowed (a floor kept outside Redis), 0 for none
-- returns  the new fencing token (> 0) when acquired, 0 when the lock is held
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
local token = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if token <= floor then
  token = floor + 1
  redis.call('SET', KEYS[2], token)
end
return token
