-- Shared by every script (prepended at load time). Time comes from the server, never a
-- client clock; every write re-arms the record's TTL.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function set_ttl(key, ttl_ms)
  redis.call('PEXPIRE', key, ttl_ms)
end

local function conflicts(stored_fp, given_fp)
  return given_fp ~= '' and stored_fp and stored_fp ~= '' and stored_fp ~= given_fp
end
