-- Move a group: the next new entry of each stream is at a position or after, and pending
-- entries at or after it are dropped (they will be delivered again as new).
-- KEYS one stream per position; ARGV[1] group, then per position: id before it, its id.
-- Returns {0}, or {n, last id} when position n (1-based) is past the end (nothing moved then).
local group = ARGV[1]
for n, key in ipairs(KEYS) do
  local last = last_id(key)
  if id_cmp(ARGV[2 * n], last) > 0 then
    return {n, last}
  end
end
for n, key in ipairs(KEYS) do
  redis.call('XGROUP', 'SETID', key, group, ARGV[2 * n])
  while true do
    local pend = redis.call('XPENDING', key, group, ARGV[2 * n + 1], '+', 1000)
    if #pend == 0 then
      break
    end
    local ids = {}
    for j, e in ipairs(pend) do
      ids[j] = e[1]
    end
    call_sliced({'XACK', key, group}, ids, {})
  end
end
return {0}
