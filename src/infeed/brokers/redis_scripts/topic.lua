-- Create a topic if missing. KEYS[1] topics hash, KEYS[2..] its partition streams.
-- ARGV[1] topic, ARGV[2] partitions. Returns {partitions the topic has, 1 if created here}.
local have = redis.call('HGET', KEYS[1], ARGV[1])
if have then
  return {tonumber(have), 0}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    -- An empty stream: created with a throwaway group, which is then dropped.
    redis.call('XGROUP', 'CREATE', KEYS[i], 'infeed-init', '$', 'MKSTREAM')
    redis.call('XGROUP', 'DESTROY', KEYS[i], 'infeed-init')
  end
end
return {tonumber(ARGV[2]), 1}
