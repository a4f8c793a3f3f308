-- A consumer leaves: its pending entries pass to a holder name, idle since 1970 so that the next
-- receive of any member claims them (delivery counts kept), and the consumer is deleted, with
-- any member that holds nothing and was idle for ARGV[4] ms (dead processes).
-- KEYS the streams; ARGV[1] group, ARGV[2] consumer, ARGV[3] holder name, ARGV[4] idle ms.
local group, consumer, holder = ARGV[1], ARGV[2], ARGV[3]
local stale = tonumber(ARGV[4])
for _, key in ipairs(KEYS) do
  local pend = redis.pcall('XPENDING', key, group, '-', '+', 1000, consumer)
  if not pend.err then
    while #pend > 0 do
      local ids = {}
      for j, e in ipairs(pend) do
        ids[j] = e[1]
      end
      call_sliced({'XCLAIM', key, group, holder, 0}, ids, {'TIME', 1, 'JUSTID'})
      pend = redis.call('XPENDING', key, group, '-', '+', 1000, consumer)
    end
    redis.call('XGROUP', 'DELCONSUMER', key, group, consumer)
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, group)) do
      local f = {}
      for j = 1, #c, 2 do
        f[c[j]] = c[j + 1]
      end
      if f['pending'] == 0 and f['idle'] >= stale then
        redis.call('XGROUP', 'DELCONSUMER', key, group, f['name'])
      end
    end
  end
end
return 0
