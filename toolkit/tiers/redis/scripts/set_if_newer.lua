-- Cache-aside fill that never lets an older version overwrite a newer one.
-- KEYS[1]  cache key; its value is "<version>|<json>"
-- ARGV[1]  version of the new value (integer)
-- ARGV[2]  new value, "<version>|<json>"
-- ARGV[3]  TTL in milliseconds, 0 for none
-- returns  1 when the value was written, 0 when a newer or equal one was kept
local current = redis.call('GET', KEYS[1])
if current then
  local v = tonumber(string.match(current, '^(%-?%d+)|'))
  if v and v >= tonumber(ARGV[1]) then
    return 0
  end
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
