-- step: KEYS[1]=record; ARGV: attempt_id, token, name, value. Only the holder records a
-- step's value (field 'p:<name>'); the record's TTL already covers it (same hash).
local r = redis.call('HMGET', KEYS[1], 's', 'h', 'k', 't', 'T')
if r[1] == 'running' and r[2] == ARGV[1] and r[3] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'p:' .. ARGV[3], ARGV[4])
  return {'recorded', r[4]}
end
return {'stale', task_of(r[4], r[5]) or '', r[1] or ''}
