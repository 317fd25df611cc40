-- Append a flush of events to their generations' streams in one call.
-- KEYS[i]: the stream of event i.  ARGV[2i-1]: its entry id (`<seq+1>-0`),
-- ARGV[2i]: its JSON body; the last ARGV: the TTL (ms) every stream gets, so a
-- running generation's stream never outlives its owner's lease refreshes.
-- An entry that exists already (a retried flush) is skipped: ids are explicit,
-- so appending is idempotent.
local appended = 0
local ttl = ARGV[#ARGV]
local seen = {}
for i, key in ipairs(KEYS) do
  local ok = redis.pcall('XADD', key, ARGV[2 * i - 1], 'e', ARGV[2 * i])
  if type(ok) ~= 'table' or not ok.err then
    appended = appended + 1
  end
  if not seen[key] then
    seen[key] = true
    redis.call('PEXPIRE', key, ttl)
  end
end
return appended
