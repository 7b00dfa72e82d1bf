-- Add to many metric counters and to their time buckets, atomically.
-- KEYS[1]      metric totals hash ({ns}:metrics)
-- KEYS[1+i]    bucket hash of metric i ({ns}:metric:<name>:buckets)
-- ARGV[1]      bucket start (unix seconds)
-- ARGV[2i]     name of metric i
-- ARGV[2i+1]   amount added to metric i (integer)
-- returns      the new totals, in the order of the metrics
local bucket = ARGV[1]
local totals = {}
for i = 1, #KEYS - 1 do
  local amount = ARGV[2 * i + 1]
  redis.call('HINCRBY', KEYS[1 + i], bucket, amount)
  totals[i] = redis.call('HINCRBY', KEYS[1], ARGV[2 * i], amount)
end
return totals
