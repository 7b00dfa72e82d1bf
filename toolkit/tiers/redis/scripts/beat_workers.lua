-- Heartbeats of many workers at once: key with TTL, bounded history, last-seen.
-- KEYS[1]      last-seen sorted set ({ns}:heartbeats)
-- KEYS[2i]     heartbeat key of worker i ({ns}:hb:<id>)
-- KEYS[2i+1]   heartbeat history list of worker i ({ns}:hbhist:<id>)
-- ARGV[1]      now (unix seconds, as text; stored and scored as sent)
-- ARGV[2]      heartbeat TTL in milliseconds
-- ARGV[3]      history length (newest first, the rest trimmed)
-- ARGV[4]      history TTL in milliseconds
-- ARGV[4+i]    id of worker i
-- returns      how many workers beat
local now, ttl, hist_ttl = ARGV[1], ARGV[2], ARGV[4]
local last = tonumber(ARGV[3]) - 1
local n = (#KEYS - 1) / 2
local seen = {}
for i = 1, n do
  local hist = KEYS[2 * i + 1]
  redis.call('SET', KEYS[2 * i], now, 'PX', ttl)
  redis.call('LPUSH', hist, now)
  redis.call('LTRIM', hist, 0, last)
  redis.call('PEXPIRE', hist, hist_ttl)
  seen[2 * i - 1] = now
  seen[2 * i] = ARGV[4 + i]
end
-- unpack() is bounded by the Lua C stack (8,000 slots): ZADD 1,000 members at a time.
for first = 1, 2 * n, 2000 do
  redis.call('ZADD', KEYS[1], unpack(seen, first, math.min(first + 1999, 2 * n)))
end
return n
