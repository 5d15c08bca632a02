-- acquire: KEYS[1]=record; ARGV: task_id, attempt_id, task_name, fingerprint, lease_ms,
-- max_deliveries, ttl_ms (the result TTL, kept as 'g' for renew). Takes the lease
-- (token + 1) or says why not.
local now = now_ms()
local r = redis.call('HMGET', KEYS[1], 's', 't', 'f', 'l', 'x', 'r', 'k', 'd', 'e', 'T', 'F')
local state, tid = r[1], task_of(r[2], r[10])
if state then
  if conflicts(fingerprint_of(r[3], r[11]), ARGV[4]) then return {'conflict', tid} end
  if state == 'done' then return {'done', tid, has_result(r[5], r[6]), r[6] or ''} end
  if state == 'failed' then return {'failed', tid, r[9] or ''} end
  local lease_until = tonumber(r[4] or '0')
  if state == 'running' and lease_until > now then return {'busy', tid, lease_until - now} end
end
local deliveries = tonumber(r[8] or '0')
if deliveries >= tonumber(ARGV[6]) then
  local err = 'poison: ' .. deliveries .. ' deliveries ended without a result'
  finish(KEYS[1], 'failed', now, r[2], r[3], {'e', err}, {})
  set_ttl(KEYS[1], tonumber(ARGV[7]))
  return {'poisoned', tid, deliveries, err}
end
local token = tonumber(r[7] or '0') + 1
local takeover = 0
if state == 'running' then takeover = 1 end
if not state then redis.call('HSET', KEYS[1], 'c', now) end
redis.call('HSET', KEYS[1], 's', 'running', 't', ARGV[1], 'n', ARGV[3], 'h', ARGV[2],
  'k', token, 'l', now + tonumber(ARGV[5]), 'd', deliveries + 1, 'u', now, 'g', ARGV[7])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'f', ARGV[4]) end
keep_ttl(KEYS[1], tonumber(ARGV[5]) + tonumber(ARGV[7]))
return {'acquired', ARGV[1], token, takeover, deliveries + 1}
