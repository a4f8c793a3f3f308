-- Lease to consumer ARGV[2] of group ARGV[1] up to ARGV[4] entries of the streams in KEYS that
-- have been idle for ARGV[3] ms or more: leases that expired, and entries given back.
-- Returns a flat list: key index, id, fields, delivery count, key index, ...
local group, consumer, idle_ms = ARGV[1], ARGV[2], ARGV[3]
local want = tonumber(ARGV[4])
local out, n = {}, 0
for ki, key in ipairs(KEYS) do
  if n >= want then
    break
  end
  local pend = redis.call('XPENDING', key, group, 'IDLE', idle_ms, '-', '+', want - n)
  if #pend > 0 then
    local ids, counts = {}, {}
    for j, e in ipairs(pend) do
      ids[j] = e[1]
      counts[e[1]] = e[4]
    end
    -- XCLAIM adds one to each count; entries trimmed meanwhile are dropped from the PEL.
    local claimed = call_sliced({'XCLAIM', key, group, consumer, idle_ms}, ids, {})
    for _, e in ipairs(claimed) do
      if e and e[2] then
        out[#out + 1] = ki
        out[#out + 1] = e[1]
        out[#out + 1] = e[2]
        out[#out + 1] = counts[e[1]] + 1
        n = n + 1
      end
    end
  end
end
return out
