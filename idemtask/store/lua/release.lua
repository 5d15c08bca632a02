-- release: KEYS[1]=record; ARGV: attempt_id, token, error, terminal ('1'/'0'), ttl_ms.
-- The holder gives the key back: idle for another try, or failed (terminal).
local r = redis.call('HMGET', KEYS[1], 's', 'h', 'k', 't', 'T', 'f')
if r[1] == 'running' and r[2] == ARGV[1] and r[3] == ARGV[2] then
  if ARGV[4] == '1' then
    finish(KEYS[1], 'failed', now_ms(), r[4], r[6], {'e', ARGV[3]}, {})
    set_ttl(KEYS[1], tonumber(ARGV[5]))
  else
    redis.call('HSET', KEYS[1], 's', 'idle', 'e', ARGV[3], 'l', 0, 'd', 0, 'u', now_ms())
    redis.call('HDEL', KEYS[1], 'h')
    keep_ttl(KEYS[1], tonumber(ARGV[5]))
  end
  return {'released', r[4]}
end
return {'stale', task_of(r[4], r[5]) or '', r[1] or ''}
