-- Append a batch to a topic atomically. KEYS[1] topics hash, KEYS[2..] the partition streams.
-- ARGV[1] topic, ARGV[2] partitions the caller assumed, then per message:
-- partition, field-pair count, field, value, ...
-- Returns {1, entries added}, or {0, actual partitions} when the caller's view is stale
-- (nothing is written then).
local have = redis.call('HGET', KEYS[1], ARGV[1])
if not have then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
elseif have ~= ARGV[2] then
  return {0, tonumber(have)}
end
return {1, append(KEYS, 2, ARGV, 3, #ARGV, now_ms())}
