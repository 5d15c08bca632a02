-- complete: KEYS[1]=record; ARGV: attempt_id, token, has_result ('1'/'0'), result, ttl_ms.
-- Only the holder may record; a stale caller gets the current state and result back.
local r = redis.call('HMGET', KEYS[1], 's', 'h', 'k', 't', 'x', 'r', 'T', 'f')
if r[1] == 'running' and r[2] == ARGV[1] and r[3] == ARGV[2] then
  if ARGV[3] == '1' then
    finish(KEYS[1], 'done', now_ms(), r[4], r[8], {'r', ARGV[4]}, {'e'})
  else
    finish(KEYS[1], 'done', now_ms(), r[4], r[8], {}, {'e', 'r'})
  end
  set_ttl(KEYS[1], tonumber(ARGV[5]))
  return {'completed', r[4]}
end
return {'stale', task_of(r[4], r[7]) or '', r[1] or '', has_result(r[5], r[6]), r[6] or ''}
