-- Pop the best queued job across several queues into the in-flight set.
-- KEYS[1]     in-flight zset (score: lease deadline)
-- KEYS[2]     in-flight meta hash (job id -> "<queue name>|<score>")
-- KEYS[3]     set of paused queue names (a paused queue hands out nothing)
-- KEYS[4..n]  queue zsets to look at
-- ARGV[1]     lease deadline (unix seconds)
-- ARGV[2..n]  queue names, in the order of KEYS[4..n]
-- returns     {job id, queue name, score as string}, or nil when every queue is empty or paused
-- Lowest score wins (highest priority, then oldest); ties go to the first queue given.
local best, best_score, best_i = nil, nil, nil
for i = 4, #KEYS do
  if redis.call('SISMEMBER', KEYS[3], ARGV[i - 2]) == 0 then
    local head = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    if head[1] then
      local s = tonumber(head[2])
      if best_score == nil or s < best_score then
        best, best_score, best_i = head[1], s, i
      end
    end
  end
end
if best == nil then
  return nil
end
local score = redis.call('ZSCORE', KEYS[best_i], best)
redis.call('ZREM', KEYS[best_i], best)
redis.call('ZADD', KEYS[1], ARGV[1], best)
redis.call('HSET', KEYS[2], best, ARGV[best_i - 2] .. '|' .. score)
return {best, ARGV[best_i - 2], score}
