-- complete: KEYS[1]=record; ARGV: attempt_id, token, has_result ('1'/'0'), result, ttl_ms.
-- Only the holder may record; a stale caller gets the current state and result back.
local r = redis.call('HMGET', KEYS[1], 's', 'h', 'k', 't', 'x', 'r')
if r[1] == 'running' and r[2] == ARGV[1] and r[3] == ARGV[2] then
  redis.call('HSET', KEYS[1], 's', 'done', 'x', ARGV[3], 'l', 0, 'd', 0, 'u', now_ms())
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[1], 'r', ARGV[4])
  else
    redis.call('HDEL', KEYS[1], 'r')
  end
  redis.call('HDEL', KEYS[1], 'h', 'e')
  set_ttl(KEYS[1], tonumber(ARGV[5]))
  return {'completed', r[4]}
end
return {'stale', r[4] or '', r[1] or '', r[5] or '0', r[6] or ''}
