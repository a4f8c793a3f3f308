-- Helpers shared by every infeed script (prepended to each one when it is loaded).
-- Stream ids are "MS-SEQ" with two unsigned 64-bit decimals: compare them as strings,
-- never as Lua numbers (doubles lose precision past 2^53).

local function num_cmp(a, b)
  if #a ~= #b then
    return #a < #b and -1 or 1
  end
  if a == b then
    return 0
  end
  return a < b and -1 or 1
end

local function id_cmp(a, b)
  local da = string.find(a, '-', 1, true)
  local db = string.find(b, '-', 1, true)
  local c = num_cmp(string.sub(a, 1, da - 1), string.sub(b, 1, db - 1))
  if c ~= 0 then
    return c
  end
  return num_cmp(string.sub(a, da + 1), string.sub(b, db + 1))
end

-- The id of the newest entry ever added to a stream ("0-0" for none or a missing stream).
local function last_id(key)
  if redis.call('EXISTS', key) == 0 then
    return '0-0'
  end
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      return info[i + 1]
    end
  end
  return '0-0'
end

-- Broker time in milliseconds, as a decimal string.
local function now_ms()
  local t = redis.call('TIME')
  return t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
end

-- Append entries described by argv[i..]: (target index, field-pair count, pairs...) repeated
-- until argv[last]. Ids are "0-*": dense sequence numbers (see redis.py). Returns entries added.
local function append(keys, base, argv, i, last, ts)
  local n = 0
  while i <= last do
    local key = keys[base + tonumber(argv[i])]
    local np = tonumber(argv[i + 1])
    redis.call('XADD', key, '0-*', 't', ts, unpack(argv, i + 2, i + 1 + 2 * np))
    i = i + 2 + 2 * np
    n = n + 1
  end
  return n
end

-- redis.call(head..., ids[s..e], tail...) for every slice of 1000 ids (Lua's unpack has a
-- C-stack limit of a few thousand values). Returns the replies, concatenated when tables.
local function call_sliced(head, ids, tail)
  local out = {}
  for s = 1, #ids, 1000 do
    local args = {}
    for _, a in ipairs(head) do
      args[#args + 1] = a
    end
    for j = s, math.min(s + 999, #ids) do
      args[#args + 1] = ids[j]
    end
    for _, a in ipairs(tail) do
      args[#args + 1] = a
    end
    local r = redis.call(unpack(args))
    if type(r) == 'table' then
      for _, x in ipairs(r) do
        out[#out + 1] = x
      end
    end
  end
  return out
end
