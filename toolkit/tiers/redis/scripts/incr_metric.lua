-- Add to a metric counter and to its time bucket, atomically.
-- KEYS[1]  metric totals hash
-- KEYS[2]  the metric's bucket hash
-- ARGV[1]  metric name
-- ARGV[2]  amount (integer)
-- ARGV[3]  bucket start (unix seconds)
-- returns  the new total
redis.call('HINCRBY', KEYS[2], ARGV[3], ARGV[2])
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
