-- Admit one generation against three limits at once, or refuse and say why.
-- KEYS: requests bucket (hash: units, ms), tokens (hash: held, recent, and
--       c:<lease id> = the tokens each live lease holds), leases (zset: id ->
--       expiry ms), recent usage (zset: '<lease id>:<tokens>' -> ended at ms)
-- ARGV: requests/min, tokens/min, concurrent streams (0 = no limit), tokens to
--       reserve, prompt tokens, lease id, lease ttl (ms), now (ms; '' = server time)
-- Requests: a bucket in 1/60000 of a request, refilling L units a millisecond.
-- Tokens: a sliding minute. A lease is admitted if the usage of the leases that
-- ended in the last minute, plus what live leases hold, plus its reservation
-- (capped at the whole budget) fits the budget. Mirrors MemoryBackend.
-- Returns {1}, or {0, limit, remaining, wait ms} for ratelimit.py to explain.
local UNIT, WINDOW = 60000, 60000
local rpm, tpm, streams = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, prompt = tonumber(ARGV[4]), tonumber(ARGV[5])
local lease, ttl = ARGV[6], tonumber(ARGV[7])
local now = tonumber(ARGV[8])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(x) return string.format('%.0f', x) end

-- Keep the tokens hash, the leases and the recent usage alive at least `ms`
-- longer, and always as long as each other: no hold or usage outlives its record.
local function keep(ms)
  local life = ms
  for i = 2, 4 do life = math.max(life, redis.call('PTTL', KEYS[i])) end
  for i = 2, 4 do
    if redis.call('PTTL', KEYS[i]) < life then redis.call('PEXPIRE', KEYS[i], life) end
  end
end

local function tokens_of(member) return tonumber(string.match(member, ':(%d+)$')) or 0 end

-- Drop the holds of leases whose replica stopped refreshing them (it crashed),
-- and the usage that left the window.
local t = redis.call('HMGET', KEYS[2], 'held', 'recent')
local held, recent = tonumber(t[1]) or 0, tonumber(t[2]) or 0
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, id in ipairs(expired) do
  local c = tonumber(redis.call('HGET', KEYS[2], 'c:' .. id))
  if c then
    held = held - c
    redis.call('HDEL', KEYS[2], 'c:' .. id)
  end
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - WINDOW)
for _, member in ipairs(gone) do recent = recent - tokens_of(member) end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - WINDOW) end
if (#expired > 0 or #gone > 0) and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'held', fmt(held), 'recent', fmt(recent))
end

if tpm > 0 and prompt > tpm then
  return {0, 'prompt_exceeds_tokens_per_minute', math.max(0, tpm - recent - held), 0}
end
if streams > 0 and redis.call('ZCARD', KEYS[3]) >= streams then
  return {0, 'concurrent_streams', 0, 0}
end
local requests
if rpm > 0 then
  local v = redis.call('HMGET', KEYS[1], 'units', 'ms')
  local stored, ms = tonumber(v[1]), tonumber(v[2])
  requests = rpm * UNIT
  if stored ~= nil and ms ~= nil then
    requests = math.min(rpm * UNIT, stored + math.max(0, now - ms) * rpm)
  end
  if requests < UNIT then
    local wait = math.floor((UNIT - requests + rpm - 1) / rpm)
    return {0, 'requests_per_minute', math.floor(requests / UNIT), wait}
  end
end
local need = 0
if tpm > 0 then
  need = math.min(reserve, tpm)
  local short = recent + held + need - tpm
  if short > 0 then
    -- Until enough usage leaves the window (or all of it: holds may end sooner).
    local freed, wait = 0, 0
    local entries = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      freed = freed + tokens_of(entries[i])
      wait = tonumber(entries[i + 1]) + WINDOW - now
      if freed >= short then break end
    end
    return {0, 'tokens_per_minute', math.max(0, tpm - recent - held), math.max(0, wait)}
  end
end

if rpm > 0 then
  redis.call('HSET', KEYS[1], 'units', fmt(requests - UNIT), 'ms', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'held', fmt(held + need), 'recent', fmt(recent),
    'c:' .. lease, fmt(need))
  redis.call('ZADD', KEYS[3], now + ttl, lease)
  keep(ttl + WINDOW)
elseif streams > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, lease)
  keep(ttl)
end
return {1}
