-- Take jobs out of a queue only where nothing moved them since the caller looked
-- (the rebuild's check of the queues it filled from its snapshot).
-- KEYS[1]  the queue zset
-- KEYS[2]  the in-flight zset
-- ARGV     triples: job id, the score the rebuild gave it, "1" if it was in flight
-- A job is removed only while it still has that score (a job queued again since has a new
-- one) and, when it was in flight, while it still is.
-- returns  how many were removed
local removed = 0
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) == tonumber(ARGV[i + 1])
      and (ARGV[i + 2] == '0' or redis.call('ZSCORE', KEYS[2], id)) then
    removed = removed + redis.call('ZREM', KEYS[1], id)
  end
end
return removed
