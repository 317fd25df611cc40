-- End a lease: free its stream slot and refund (or charge) the token difference.
-- KEYS: tokens bucket (hash), streams (zset of leases)
-- ARGV: tokens/min (0 = no limit), refund (reserved - used; negative charges), lease id
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
if tpm > 0 and refund ~= 0 then
  local v = redis.call('HMGET', KEYS[1], 'level', 'ts')
  local stored, ts = tonumber(v[1]), tonumber(v[2])
  local current = tpm
  if stored ~= nil and ts ~= nil then
    current = math.min(tpm, stored + (now - ts) * tpm / 60000)
  end
  redis.call('HSET', KEYS[1], 'level', tostring(math.min(tpm, current + refund)), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
return 1
