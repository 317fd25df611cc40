-- Keep a replica's live leases from expiring (a crashed replica's leases do).
-- KEYS: tokens (hash), leases (zset), recent usage (zset), as in acquire.lua
-- ARGV: ttl (ms), now (ms; '' = server time), lease ids...
local now = tonumber(ARGV[2])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ttl = tonumber(ARGV[1])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[2], 'XX', now + ttl, ARGV[i])
end
-- The holds of live leases, the record of their expiry and the recent usage
-- outlive the leases and each other (as in acquire.lua).
local life = ttl + 60000
for i = 1, 3 do life = math.max(life, redis.call('PTTL', KEYS[i])) end
for i = 1, 3 do
  if redis.call('PTTL', KEYS[i]) < life then redis.call('PEXPIRE', KEYS[i], life) end
end
return 1
