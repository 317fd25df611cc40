-- End a lease: free its stream slot and its hold, and charge what it used.
-- KEYS: tokens bucket (hash, see acquire.lua), leases (zset)
-- ARGV: tokens/min (0 = no limit), tokens used, lease id, now (ms; '' = server time)
-- Usage is charged in full even past the reservation (the bucket goes below
-- zero: a debt repaid before anything else is admitted). Mirrors MemoryBackend.
local UNIT = 60000
local tpm, used, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local now = tonumber(ARGV[4])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(x) return string.format('%.0f', x) end

-- As in acquire.lua: both keys live at least `ms` longer, and as long as each other.
local function keep(ms)
  local life = math.max(ms, redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2]))
  for i = 1, 2 do
    if redis.call('PTTL', KEYS[i]) < life then redis.call('PEXPIRE', KEYS[i], life) end
  end
end

redis.call('ZREM', KEYS[2], lease)
local v = redis.call('HMGET', KEYS[1], 'units', 'ms', 'held', 'c:' .. lease)
local stored, ms = tonumber(v[1]), tonumber(v[2])
local held, charge = tonumber(v[3]) or 0, tonumber(v[4])
if charge then
  held = held - charge
  redis.call('HDEL', KEYS[1], 'c:' .. lease)
end
if tpm > 0 then
  local tokens = tpm * UNIT
  if stored ~= nil and ms ~= nil then
    tokens = math.min(tpm * UNIT, stored + math.max(0, now - ms) * tpm)
  end
  tokens = tokens - used * UNIT
  redis.call('HSET', KEYS[1], 'units', fmt(tokens), 'ms', now, 'held', fmt(held))
  keep(math.ceil((tpm * UNIT - tokens) / tpm) + 60000)
elseif charge then
  redis.call('HSET', KEYS[1], 'held', fmt(held))
end
return 1
