-- renew: KEYS[1]=record; ARGV: attempt_id, token, lease_ms. 1 if still held, else 0.
-- The record keeps living the result TTL ('g', set by acquire) past the new deadline.
local r = redis.call('HMGET', KEYS[1], 's', 'h', 'k', 'g')
if r[1] == 'running' and r[2] == ARGV[1] and r[3] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'l', now_ms() + tonumber(ARGV[3]))
  keep_ttl(KEYS[1], tonumber(ARGV[3]) + tonumber(r[4] or '0'))
  return 1
end
return 0
