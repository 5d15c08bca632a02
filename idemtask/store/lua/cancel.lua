-- cancel: KEYS[1]=record; ARGV: task_id. Undo our own reservation after a failed publish.
local r = redis.call('HMGET', KEYS[1], 's', 't', 'T')
if r[1] == 'queued' and r[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 's', 'idle', 'l', 0, 'u', now_ms())
  return {'released', r[2]}
end
return {'stale', task_of(r[2], r[3]) or '', r[1] or ''}
