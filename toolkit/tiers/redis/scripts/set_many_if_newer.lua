-- Cache fills in bulk, each one never overwriting a newer version.
-- KEYS[i]      cache key i; its value is "<version>|<json>"
-- ARGV[3i-2]   version of the new value i (integer)
-- ARGV[3i-1]   new value i, "<version>|<json>"
-- ARGV[3i]     TTL of value i in milliseconds, 0 for none
-- returns      how many values were written
local written = 0
for i = 1, #KEYS do
  local version = tonumber(ARGV[3 * i - 2])
  local current = redis.call('GET', KEYS[i])
  local keep = false
  if current then
    local v = tonumber(string.match(current, '^(%-?%d+)|'))
    keep = v ~= nil and v >= version
  end
  if not keep then
    local ttl = tonumber(ARGV[3 * i])
    if ttl > 0 then
      redis.call('SET', KEYS[i], ARGV[3 * i - 1], 'PX', ttl)
    else
      redis.call('SET', KEYS[i], ARGV[3 * i - 1])
    end
    written = written + 1
  end
end
return written
