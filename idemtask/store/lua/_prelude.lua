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

-- Finished records (done, failed) keep a compact layout (docs/architecture.md, "The
-- record"): a lowercase UUID task id as its 16 bytes in 'T' instead of 't', a lowercase hex
-- fingerprint as its bytes in 'F' instead of 'f'. Records still in play keep the text forms.
local HEX = '[0-9a-f]'
local UUID = '^' .. string.rep(HEX, 8) .. '%-' .. string.rep(HEX, 4) .. '%-' ..
  string.rep(HEX, 4) .. '%-' .. string.rep(HEX, 4) .. '%-' .. string.rep(HEX, 12) .. '$'

local function from_hex(hex)
  return (string.gsub(hex, '..', function(pair) return string.char(tonumber(pair, 16)) end))
end

local function to_hex(raw)
  return (string.gsub(raw, '.', function(c) return string.format('%02x', string.byte(c)) end))
end

-- The task id from either form ('t' text, 'T' packed); false when the record has none.
local function task_of(t, packed)
  if t or not packed then return t end
  local h = to_hex(packed)
  return string.sub(h, 1, 8) .. '-' .. string.sub(h, 9, 12) .. '-' .. string.sub(h, 13, 16) ..
    '-' .. string.sub(h, 17, 20) .. '-' .. string.sub(h, 21)
end

-- The fingerprint from either form ('f' text, 'F' packed).
local function fingerprint_of(f, packed)
  if packed then return to_hex(packed) end
  return f
end

-- The has-result flag: 'x' in records finished before the compact layout, else whether
-- the record holds a result 'r' at all.
local function has_result(x, result)
  if x then return x end
  if result then return '1' end
  return '0'
end

local function conflicts(stored_fp, given_fp)
  return given_fp ~= '' and stored_fp and stored_fp ~= '' and stored_fp ~= given_fp
end

-- Make the record terminal in one HSET and one HDEL: the lease, holder, deliveries, result
-- TTL and created time go (no transition reads them again), 't' and 'f' are packed; 'set'
-- and 'gone' are the caller's own fields to write and to drop.
local function finish(key, state, now, t, f, set, gone)
  local function add(list, ...)
    for _, item in ipairs({...}) do list[#list + 1] = item end
  end
  add(set, 's', state, 'u', now)
  add(gone, 'l', 'd', 'g', 'h', 'c')
  if t and string.find(t, UUID) then
    add(set, 'T', from_hex((string.gsub(t, '%-', ''))))
    add(gone, 't')
  end
  if f and f ~= '' and #f % 2 == 0 and not string.find(f, '[^0-9a-f]') then
    add(set, 'F', from_hex(f))
    add(gone, 'f')
  end
  -- HSET first: under maxmemory a script's first write is the one refused (OOM), so the
  -- transition fails whole rather than being let through after a write that frees memory.
  redis.call('HSET', key, unpack(set))
  redis.call('HDEL', key, unpack(gone))
end
