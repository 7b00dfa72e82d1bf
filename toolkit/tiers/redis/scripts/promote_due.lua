-- Move the due jobs of some queues from their due-time sets into the queues, atomically.
-- KEYS[1]      scheduled meta hash (job id -> its score in the queue)
-- KEYS[2k]     the due-time zset of a queue (score = due time, unix seconds)
-- KEYS[2k+1]   that queue's zset, for k = 1 .. (#KEYS - 1) / 2
-- ARGV[1]      now (unix seconds): members scored at or below it are due
-- ARGV[2]      most jobs to move per queue in this call
-- returns      how many jobs were moved
-- A member without a meta entry is dropped from its set (repair() queues it again from
-- PostgreSQL) rather than left to block the jobs due after it.
local moved = 0
for k = 2, #KEYS, 2 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
  for _, id in ipairs(due) do
    local score = redis.call('HGET', KEYS[1], id)
    if score then
      redis.call('ZADD', KEYS[k + 1], score, id)
      moved = moved + 1
    end
    redis.call('ZREM', KEYS[k], id)
    redis.call('HDEL', KEYS[1], id)
  end
end
return moved
