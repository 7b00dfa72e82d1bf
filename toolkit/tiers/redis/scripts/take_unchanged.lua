-- Take jobs out of a queue only where they still have the score the caller saw
-- (the queue settling of a catch-up, which reads PostgreSQL again afterwards).
-- KEYS[1]  the queue zset
-- ARGV     pairs: job id, the score seen
-- returns  the ids taken out
local taken = {}
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], id)
    taken[#taken + 1] = id
  end
end
return taken
