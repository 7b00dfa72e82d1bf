-- Pop up to n of the best queued jobs across several queues into the in-flight set.
-- KEYS[1]     in-flight zset (score: lease deadline)
-- KEYS[2]     in-flight meta hash (job id -> "<queue name>|<score>")
-- KEYS[3]     set of paused queue names (a paused queue hands out nothing)
-- KEYS[4..n]  queue zsets to look at
-- ARGV[1]     lease deadline (unix seconds)
-- ARGV[2]     how many jobs to pop at most
-- ARGV[3..n]  queue names, in the order of KEYS[4..n]
-- returns     a flat list {job id, queue name, score as string, ...}, best first (empty: none)
-- The order is claim_job.lua's, popped n times: lowest score first, ties to the first queue.
local n = tonumber(ARGV[2])
local heads, pos = {}, {}
for i = 4, #KEYS do
  if redis.call('SISMEMBER', KEYS[3], ARGV[i - 1]) == 0 then
    heads[i] = redis.call('ZRANGE', KEYS[i], 0, n - 1, 'WITHSCORES')
  else
    heads[i] = {}
  end
  pos[i] = 1
end
local out = {}
for _ = 1, n do
  local best_i, best_score = nil, nil
  for i = 4, #KEYS do
    local h = heads[i]
    if h[pos[i]] then
      local s = tonumber(h[pos[i] + 1])
      if best_score == nil or s < best_score then
        best_i, best_score = i, s
      end
    end
  end
  if best_i == nil then
    break
  end
  local id, score = heads[best_i][pos[best_i]], heads[best_i][pos[best_i] + 1]
  pos[best_i] = pos[best_i] + 2
  redis.call('ZREM', KEYS[best_i], id)
  redis.call('ZADD', KEYS[1], ARGV[1], id)
  redis.call('HSET', KEYS[2], id, ARGV[best_i - 1] .. '|' .. score)
  out[#out + 1] = id
  out[#out + 1] = ARGV[best_i - 1]
  out[#out + 1] = score
end
return out
