-- Keep a replica's live leases from expiring (a crashed replica's leases do).
-- KEYS: tokens bucket (hash, see acquire.lua), leases (zset)
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
-- The holds of live leases, and the record of their expiry, outlive the leases
-- and each other (as in acquire.lua).
local life = math.max(ttl + 60000, redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2]))
for i = 1, 2 do
  if redis.call('PTTL', KEYS[i]) < life then redis.call('PEXPIRE', KEYS[i], life) end
end
return 1
