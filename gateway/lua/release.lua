-- End a lease: free its stream slot and its hold, and record what it used.
-- KEYS: tokens (hash), leases (zset), recent usage (zset), as in acquire.lua
-- ARGV: tokens/min (0 = no limit), tokens used, lease id, now (ms; '' = server time)
-- Usage is recorded in full even past the reservation, stamped now: it counts
-- against the budget for the next minute. Mirrors MemoryBackend.
local WINDOW = 60000
local tpm, used, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local now = tonumber(ARGV[4])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(x) return string.format('%.0f', x) end

redis.call('ZREM', KEYS[2], lease)
local v = redis.call('HMGET', KEYS[1], 'held', 'recent', 'c:' .. lease)
local held, recent, charge = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3])
if charge then
  held = held - charge
  redis.call('HDEL', KEYS[1], 'c:' .. lease)
end
if tpm > 0 and used > 0 then
  recent = recent + used
  redis.call('ZADD', KEYS[3], now, lease .. ':' .. fmt(used))
end
if charge or (tpm > 0 and used > 0) then
  redis.call('HSET', KEYS[1], 'held', fmt(held), 'recent', fmt(recent))
  -- As in acquire.lua: all three live at least a window longer, and as long as each other.
  local life = WINDOW + 1000
  for i = 1, 3 do life = math.max(life, redis.call('PTTL', KEYS[i])) end
  for i = 1, 3 do
    if redis.call('PTTL', KEYS[i]) < life then redis.call('PEXPIRE', KEYS[i], life) end
  end
end
return 1
