-- Admit one generation against three limits at once, or refuse and say why.
-- KEYS: requests bucket (hash), tokens bucket (hash), streams (zset of leases)
-- ARGV: requests/min, tokens/min, concurrent streams (0 = no limit),
--       tokens to reserve, lease id, lease ttl (ms)
-- Returns {allowed, limit, retry_after_ms, remaining}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, streams = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, lease, ttl = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])

-- A bucket refills its whole capacity over 60 s.
local function level(key, capacity)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local stored, ts = tonumber(v[1]), tonumber(v[2])
  if stored == nil or ts == nil then return capacity end
  return math.min(capacity, stored + (now - ts) * capacity / 60000)
end

if streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= streams then
    return {0, 'concurrent_streams', 1000, 0}
  end
end
local requests, tokens, need
if rpm > 0 then
  requests = level(KEYS[1], rpm)
  if requests < 1 then
    return {0, 'requests_per_minute', math.ceil((1 - requests) * 60000 / rpm), 0}
  end
end
if tpm > 0 then
  need = math.min(reserve, tpm)
  tokens = level(KEYS[2], tpm)
  if tokens < need then
    return {0, 'tokens_per_minute', math.ceil((need - tokens) * 60000 / tpm), math.floor(tokens)}
  end
end

if rpm > 0 then
  redis.call('HSET', KEYS[1], 'level', tostring(requests - 1), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'level', tostring(tokens - need), 'ts', now)
  redis.call('PEXPIRE', KEYS[2], 120000)
end
if streams > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, lease)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {1, '', 0, 0}
