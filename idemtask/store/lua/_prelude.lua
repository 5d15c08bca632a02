-- Shared by every script (prepended at load time). Time comes from the server, never a
-- client clock. Record lifetime (docs/architecture.md): a record that is not terminal
-- lives at least its lease time left + the result TTL ('g'), and only terminal records
-- are set to exactly the result TTL.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Terminal records (done, failed): exactly the result TTL.
local function set_ttl(key, ttl_ms)
  redis.call('PEXPIRE', key, ttl_ms)
end

-- Records still in play: at least ttl_ms from now, never shorter than they already live.
local function keep_ttl(key, ttl_ms)
  if redis.call('PTTL', key) < ttl_ms then
    redis.call('PEXPIRE', key, ttl_ms)
  end
end

local function conflicts(stored_fp, given_fp)
  return given_fp ~= '' and stored_fp and stored_fp ~= '' and stored_fp ~= given_fp
end
