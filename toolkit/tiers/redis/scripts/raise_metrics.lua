-- Raise metric totals to at least the given values (restore after a Redis loss).
-- KEYS[1]  metric totals hash
-- ARGV     name1, value1, name2, value2, ...
-- returns  how many totals were raised
local raised = 0
for i = 1, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if current < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    raised = raised + 1
  end
end
return raised
