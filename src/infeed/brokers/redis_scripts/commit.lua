-- Store committed positions. KEYS[1] the topic's commits hash, KEYS[2..] one stream per position.
-- ARGV[1] group, then per position: partition, id before it, its id.
-- Returns {0}, or {n, last id} when position n (1-based) is past the end (nothing stored then).
for n = 2, #KEYS do
  local j = 2 + 3 * (n - 2)
  local last = last_id(KEYS[n])
  if id_cmp(ARGV[j + 1], last) > 0 then
    return {n - 1, last}
  end
end
for n = 2, #KEYS do
  local j = 2 + 3 * (n - 2)
  redis.call('HSET', KEYS[1], ARGV[1] .. ':' .. ARGV[j], ARGV[j + 2])
end
return {0}
