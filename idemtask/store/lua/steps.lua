-- steps: KEYS[1]=record; ARGV: attempt_id, token. The holder reads the steps recorded so
-- far ('p:<name>' fields) in one round trip; anyone else is stale.
local r = redis.call('HMGET', KEYS[1], 's', 'h', 'k', 't', 'T')
if not (r[1] == 'running' and r[2] == ARGV[1] and r[3] == ARGV[2]) then
  return {'stale', task_of(r[4], r[5]) or '', r[1] or ''}
end
local out = {'held', r[4]}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, 2) == 'p:' then
    out[#out + 1] = string.sub(all[i], 3)
    out[#out + 1] = all[i + 1]
  end
end
return out
