-- Drop entries every group has committed past (ARGV[1] == '1') and/or all but the newest
-- ARGV[2] entries (when not empty). KEYS[1] the commits hash, KEYS[2..] the streams in
-- partition order. Returns how many entries were dropped.
local dropped = 0
for i = 2, #KEYS do
  local key = KEYS[i]
  if redis.call('EXISTS', key) == 1 then
    if ARGV[1] == '1' then
      local floor, groups = nil, redis.call('XINFO', 'GROUPS', key)
      for _, g in ipairs(groups) do
        local name
        for j = 1, #g, 2 do
          if g[j] == 'name' then
            name = g[j + 1]
          end
        end
        local c = redis.call('HGET', KEYS[1], name .. ':' .. (i - 2))
        if not c then
          -- a group that never committed keeps everything
          floor = nil
          break
        end
        if floor == nil or id_cmp(c, floor) < 0 then
          floor = c
        end
      end
      if floor then
        dropped = dropped + redis.call('XTRIM', key, 'MINID', '=', floor)
      end
    end
    if ARGV[2] ~= '' then
      dropped = dropped + redis.call('XTRIM', key, 'MAXLEN', '=', ARGV[2])
    end
  end
end
return dropped
