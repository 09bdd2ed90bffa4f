"""Lua scripts for ``RedisLedger``. Each runs atomically in Redis: that is the whole
concurrency story. Counter hashes ``<p>:b:<tenant>:<window key>`` hold spent and held
tokens (``st``, ``ht``) and USD in 1e-10 units (``su``, ``hu``); a reservation is a JSON
string ``<p>:r:<id>`` plus its expiry (ms) in the sorted set ``<p>:rexp``. Holds and
spends only ever touch counters that exist (were loaded from the rows); amounts are
passed as integer strings so HINCRBY stays exact."""

# ARGV: prefix, tenant, n, (window key, max tokens|'', max units|'') * n,
#       tokens, units, reservation id, expires (ms), record JSON
# -> {'ok'} | {'load', i} | {'tokens'|'usd', i, used}
RESERVE = """
local p, tenant, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local b = 3 + 3 * n
local tokens, units, rid = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
local rkey = p .. ':r:' .. rid
if redis.call('EXISTS', rkey) == 1 then return {'ok'} end
local keys = {}
for i = 1, n do
  local a = 3 + 3 * (i - 1)
  local key = p .. ':b:' .. tenant .. ':' .. ARGV[a + 1]
  keys[i] = key
  local v = redis.call('HMGET', key, 'st', 'su', 'ht', 'hu')
  if not v[1] then return {'load', i} end
  local used_t = tonumber(v[1]) + tonumber(v[3])
  if ARGV[a + 2] ~= '' and used_t + tonumber(tokens) > tonumber(ARGV[a + 2]) then
    return {'tokens', i, string.format('%.0f', used_t)}
  end
  local used_u = tonumber(v[2]) + tonumber(v[4])
  if ARGV[a + 3] ~= '' and used_u + tonumber(units) > tonumber(ARGV[a + 3]) then
    return {'usd', i, string.format('%.0f', used_u)}
  end
end
local seen = {}
for i = 1, n do
  if not seen[keys[i]] then
    seen[keys[i]] = true
    if tokens ~= '0' then redis.call('HINCRBY', keys[i], 'ht', tokens) end
    if units ~= '0' then redis.call('HINCRBY', keys[i], 'hu', units) end
  end
end
redis.call('SET', rkey, ARGV[b + 5])
redis.call('ZADD', p .. ':rexp', ARGV[b + 4], rid)
return {'ok'}
"""

# ARGV: key, spent tokens, spent units, ttl ms (0 = none) -> 1 if installed, 0 if present
INSTALL = """
if redis.call('EXISTS', ARGV[1]) == 1 then return 0 end
redis.call('HSET', ARGV[1], 'st', ARGV[2], 'su', ARGV[3], 'ht', '0', 'hu', '0')
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', ARGV[1], ARGV[4]) end
return 1
"""

# ARGV: prefix, batch id ('' = none), marker ttl s, n drops, reservation id * n,
#       m spends, (counter key, tokens, units) * m -> 1 applied, 0 already applied
APPLY = """
local p = ARGV[1]
if ARGV[2] ~= '' then
  if not redis.call('SET', p .. ':applied:' .. ARGV[2], '1', 'NX', 'EX', ARGV[3]) then return 0 end
end
local i = 5
for _ = 1, tonumber(ARGV[4]) do
  local rid = ARGV[i]
  i = i + 1
  local raw = redis.call('GET', p .. ':r:' .. rid)
  if raw then
    local r = cjson.decode(raw)
    for _, key in ipairs(r.keys) do
      if redis.call('EXISTS', key) == 1 then
        if r.t ~= '0' then redis.call('HINCRBY', key, 'ht', '-' .. r.t) end
        if r.u ~= '0' then redis.call('HINCRBY', key, 'hu', '-' .. r.u) end
      end
    end
    redis.call('DEL', p .. ':r:' .. rid)
  end
  redis.call('ZREM', p .. ':rexp', rid)
end
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  local key = ARGV[i]
  if redis.call('EXISTS', key) == 1 then
    if ARGV[i + 1] ~= '0' then redis.call('HINCRBY', key, 'st', ARGV[i + 1]) end
    if ARGV[i + 2] ~= '0' then redis.call('HINCRBY', key, 'su', ARGV[i + 2]) end
  end
  i = i + 3
end
return 1
"""

# ARGV: prefix, now ms, lease ms, limit -> records of expired reservations, each now
# leased to the caller (its expiry moved to now + lease)
CLAIM = """
local p = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', p .. ':rexp', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, rid in ipairs(ids) do
  local raw = redis.call('GET', p .. ':r:' .. rid)
  if raw then
    redis.call('ZADD', p .. ':rexp', tonumber(ARGV[2]) + tonumber(ARGV[3]), rid)
    out[#out + 1] = raw
  else
    redis.call('ZREM', p .. ':rexp', rid)
  end
end
return out
"""
