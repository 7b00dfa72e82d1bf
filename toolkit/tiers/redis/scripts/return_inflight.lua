-- Put an in-flight job back on its queue, once (a janitor or a failed claim).
-- KEYS[1]  in-flight zset
-- KEYS[2]  in-flight meta hash
-- KEYS[3]  the queue zset the job came from
-- ARGV[1]  job id
-- ARGV[2]  score it had in the queue
-- ARGV[3]  "1" to put it back on the queue, "0" only to forget it
-- returns  1 when the job was in flight (and was moved), 0 otherwise
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
end
return 1
