-- Admit one generation against three limits at once, or refuse and say why.
-- KEYS: requests bucket (hash), tokens bucket (hash: units, ms, held, and
--       c:<lease id> = the units each live lease holds), leases (zset: id -> expiry ms)
-- ARGV: requests/min, tokens/min, concurrent streams (0 = no limit), tokens to
--       reserve, prompt tokens, lease id, lease ttl (ms), now (ms; '' = server time)
-- Levels are integers in 1/60000 of a token (or request): a limit of L a minute
-- refills L units a millisecond. The tokens bucket holds *settled* usage (it may
-- be below zero); a lease is admitted if the bucket less what live leases hold
-- covers its reservation (capped at the whole budget). Mirrors MemoryBackend.
-- Returns {1}, or {0, limit, level, held, need} (units) for ratelimit.py to explain.
local UNIT = 60000
local rpm, tpm, streams = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, prompt = tonumber(ARGV[4]), tonumber(ARGV[5])
local lease, ttl = ARGV[6], tonumber(ARGV[7])
local now = tonumber(ARGV[8])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(x) return string.format('%.0f', x) end

-- Keep the tokens hash and the leases zset alive at least `ms` longer, and
-- always for as long as each other: no hold outlives the record of its expiry.
local function keep(ms)
  local life = math.max(ms, redis.call('PTTL', KEYS[2]), redis.call('PTTL', KEYS[3]))
  for i = 2, 3 do
    if redis.call('PTTL', KEYS[i]) < life then redis.call('PEXPIRE', KEYS[i], life) end
  end
end

local function level(key, limit)
  local v = redis.call('HMGET', key, 'units', 'ms')
  local stored, ms = tonumber(v[1]), tonumber(v[2])
  if stored == nil or ms == nil then return limit * UNIT end
  return math.min(limit * UNIT, stored + math.max(0, now - ms) * limit)
end

-- Drop the holds of leases whose replica stopped refreshing them (it crashed).
local held = tonumber(redis.call('HGET', KEYS[2], 'held')) or 0
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
if #expired > 0 then
  for _, id in ipairs(expired) do
    local c = tonumber(redis.call('HGET', KEYS[2], 'c:' .. id))
    if c then
      held = held - c
      redis.call('HDEL', KEYS[2], 'c:' .. id)
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[2], 'held', fmt(held))
  end
end

if tpm > 0 and prompt > tpm then
  return {0, 'prompt_exceeds_tokens_per_minute', level(KEYS[2], tpm), held, prompt * UNIT}
end
if streams > 0 and redis.call('ZCARD', KEYS[3]) >= streams then
  return {0, 'concurrent_streams', 0, 0, 0}
end
local requests, tokens
if rpm > 0 then
  requests = level(KEYS[1], rpm)
  if requests < UNIT then
    return {0, 'requests_per_minute', requests, 0, UNIT}
  end
end
local need = 0
if tpm > 0 then
  need = math.min(reserve, tpm) * UNIT
  tokens = level(KEYS[2], tpm)
  if tokens - held < need then
    return {0, 'tokens_per_minute', tokens, held, need}
  end
end

if rpm > 0 then
  redis.call('HSET', KEYS[1], 'units', fmt(requests - UNIT), 'ms', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'units', fmt(tokens), 'ms', now, 'held', fmt(held + need),
    'c:' .. lease, fmt(need))
  redis.call('ZADD', KEYS[3], now + ttl, lease)
  -- Until the bucket is full again (a debt is never forgotten) and the lease has
  -- long expired.
  keep(math.max(ttl, math.ceil((tpm * UNIT - tokens) / tpm)) + 60000)
elseif streams > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, lease)
  keep(ttl)
end
return {1}
