-- Delete a topic. KEYS[1] topics hash, KEYS[2] its commits hash, KEYS[3..] its streams.
-- ARGV[1] topic, ARGV[2] partitions the caller assumed.
-- Returns -1 when there is no such topic, 0 when deleted, else the actual partition count
-- (the caller's view was stale; nothing deleted).
local have = redis.call('HGET', KEYS[1], ARGV[1])
if not have then
  return -1
end
if have ~= ARGV[2] then
  return tonumber(have)
end
for i = 2, #KEYS do
  redis.call('DEL', KEYS[i])
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 0
