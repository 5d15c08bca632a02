-- reserve: KEYS[1]=record; ARGV: task_id, task_name, fingerprint, reservation_ms, ttl_ms
-- absent / idle / expired reservation or lease -> queued (new); otherwise duplicate.
local now = now_ms()
local r = redis.call('HMGET', KEYS[1], 's', 't', 'f', 'l', 'x', 'r', 'T', 'F')
local state, tid = r[1], task_of(r[2], r[7])
if state then
  if conflicts(fingerprint_of(r[3], r[8]), ARGV[3]) then return {'conflict', tid} end
  if state == 'done' then
    return {'duplicate', tid, state, has_result(r[5], r[6]), r[6] or ''}
  end
  if state == 'failed' then return {'duplicate', tid, state, '0', ''} end
  if (state == 'queued' or state == 'running') and tonumber(r[4] or '0') > now then
    return {'duplicate', tid, state, '0', ''}
  end
else
  redis.call('HSET', KEYS[1], 'c', now, 'k', 0, 'd', 0)
end
redis.call('HSET', KEYS[1], 's', 'queued', 't', ARGV[1], 'n', ARGV[2],
  'l', now + tonumber(ARGV[4]), 'u', now)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'f', ARGV[3]) end
keep_ttl(KEYS[1], math.max(tonumber(ARGV[5]), tonumber(ARGV[4])))
return {'new', ARGV[1]}
