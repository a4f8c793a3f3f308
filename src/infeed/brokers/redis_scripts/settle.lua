-- Ack, requeue or dead-letter leased entries, each only if its lease still holds: the entry is
-- pending for the consumer that leased it, with the delivery count it was delivered with.
-- KEYS[1] topics hash, KEYS[2 .. 1+N] source streams, then the dead-letter topic's streams.
-- ARGV[1] mode: ack | requeue | dead; ARGV[2] group; ARGV[3] '1' on a retried call (an entry
-- no longer pending was settled by the first attempt); ARGV[4] N; ARGV[5] dead-letter topic
-- (requeue mode: the member that holds given-back entries); ARGV[6] its partitions; then runs of: source index, owner, first id, last id, the k ids
-- joined by spaces, their k delivery counts joined by spaces ('' when all are 1), and in dead
-- mode k times:
-- dead-letter partition, field-pair count, pairs...
-- Returns the lost ones as a flat list: source index, id, ...
local mode, group, retried = ARGV[1], ARGV[2], ARGV[3] == '1'
local nsrc = tonumber(ARGV[4])
local lost, dead, ts = {}, 0, nil
local i = 7
while i <= #ARGV do
  local si = ARGV[i]
  local key = KEYS[1 + tonumber(si)]
  local owner = ARGV[i + 1]
  local pend = redis.call('XPENDING', key, group, ARGV[i + 2], ARGV[i + 3], 1000000000, owner)
  local have = {}
  for _, e in ipairs(pend) do
    have[e[1]] = e[4]
  end
  local counts = ARGV[i + 5] ~= '' and string.gmatch(ARGV[i + 5], '%d+')
  local ids = ARGV[i + 4]
  i = i + 6
  local ok = {}
  for id in string.gmatch(ids, '%S+') do
    local count = counts and tonumber(counts()) or 1
    local held = have[id] == count
    local settled = false
    if not held and retried and have[id] == nil then
      settled = #redis.call('XPENDING', key, group, id, id, 1) == 0
    end
    if mode == 'dead' then
      local np = tonumber(ARGV[i + 1])
      if held then
        ts = ts or now_ms()
        redis.call('XADD', KEYS[2 + nsrc + tonumber(ARGV[i])], '0-*', 't', ts,
          unpack(ARGV, i + 2, i + 1 + 2 * np))
        dead = dead + 1
      end
      i = i + 2 + 2 * np
    end
    if held then
      ok[#ok + 1] = id
    elseif not settled then
      lost[#lost + 1] = si
      lost[#lost + 1] = id
    end
  end
  if #ok > 0 then
    if mode == 'requeue' then
      -- Passed to the holder (so the old delivery's lease is gone), same count, idle since
      -- 1970: the next receive of any member claims it.
      call_sliced({'XCLAIM', key, group, ARGV[5], 0}, ok, {'TIME', 1, 'JUSTID'})
    else
      call_sliced({'XACK', key, group}, ok, {})
    end
  end
end
if dead > 0 then
  redis.call('HSETNX', KEYS[1], ARGV[5], ARGV[6])
end
return lost
