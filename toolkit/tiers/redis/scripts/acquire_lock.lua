-- Take a lock if it is free and hand out the next fencing token.
-- KEYS[1]  lock key (value: owner token)
-- KEYS[2]  fencing counter of the lock
-- KEYS[3]  highest token reserved in PostgreSQL for this lock
-- ARGV[1]  owner token (random)
-- ARGV[2]  lock TTL in milliseconds
-- ARGV[3]  floor: the counter must be at least this (the last reservation), or ''
-- ARGV[4]  new reservation recorded in PostgreSQL by the caller, or ''
-- returns  the new fencing token (> 0) when acquired, 0 when the lock is held,
--          -1 when a new reservation is needed first (none, or used up)
-- Tokens never go backwards, even when Redis lost the counter: the counter
-- restarts from the PostgreSQL reservation, which is above every token issued.
if ARGV[4] ~= '' then
  local current = tonumber(redis.call('GET', KEYS[2]) or '0')
  if current < tonumber(ARGV[3]) then
    redis.call('SET', KEYS[2], ARGV[3])
  end
  redis.call('SET', KEYS[3], ARGV[4])
end
local reserved = tonumber(redis.call('GET', KEYS[3]) or '-1')
local counter = tonumber(redis.call('GET', KEYS[2]) or '0')
if counter + 1 > reserved then
  return -1
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
return redis.call('INCR', KEYS[2])
