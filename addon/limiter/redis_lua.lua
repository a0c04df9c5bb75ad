-- agent-egress limiter: one atomic script for admit, settle and release (DESIGN §6).
-- ARGV[1] = op, ARGV[2] = key prefix, ARGV[3] = now (ms), ARGV[4] = reservation id.
-- Counters are hashes <p>bc:<scope>|<window> with sn/st (spent nano-USD/tokens) and
-- rn/rt (reserved). A reservation is a hash <p>res:<id> listing what it holds, and a
-- member of the <p>leases sorted set scored by its expiry: expired ones are released
-- by the next admit on any replica.
local op, p, now, rid = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

local function release(id, actual_tokens)
  local rk = p .. 'res:' .. id
  local f = redis.call('HGETALL', rk)
  for i = 1, #f, 2 do
    local name, v = f[i], f[i + 1]
    local kind, rest = string.sub(name, 1, 2), string.sub(name, 3)
    if kind == 'b:' then
      local n, t = string.match(v, '^(%-?%d+) (%-?%d+)$')
      redis.call('HINCRBY', p .. 'bc:' .. rest, 'rn', -tonumber(n))
      redis.call('HINCRBY', p .. 'bc:' .. rest, 'rt', -tonumber(t))
    elseif kind == 'c:' then
      redis.call('ZREM', p .. 'rc:' .. rest, id)
    elseif kind == 't:' and actual_tokens ~= nil then
      local tk = p .. 'rt:' .. rest
      if redis.call('EXISTS', tk) == 1 then
        local c = redis.call('INCRBY', tk, actual_tokens - tonumber(v))
        if c < 0 then redis.call('SET', tk, 0, 'KEEPTTL') end
      end
    end
  end
  redis.call('DEL', rk)
  redis.call('ZREM', p .. 'leases', id)
end

if op == 'admit' then
  -- ARGV[5..10] = lease ms, est nano, est tokens, minute, #rate lines, #budget lines
  local lease, est_n, est_t = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  local minute, nr, nb = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
  if redis.call('EXISTS', p .. 'limits-ready') == 0 then return {'rebuild'} end
  local dead = redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', now, 'LIMIT', 0, 64)
  for _, d in ipairs(dead) do release(d, nil) end
  local i = 11
  -- rate lines: scope, rpm, tpm, concurrent (-1 = none)
  for r = 1, nr do
    local scope = ARGV[i]
    local rpm, tpm, conc = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    local reqs = tonumber(redis.call('GET', p .. 'rm:' .. scope .. ':' .. minute) or '0')
    local toks = tonumber(redis.call('GET', p .. 'rt:' .. scope .. ':' .. minute) or '0')
    local streams = 0
    if conc >= 0 then
      redis.call('ZREMRANGEBYSCORE', p .. 'rc:' .. scope, '-inf', now)
      streams = redis.call('ZCARD', p .. 'rc:' .. scope)
    end
    if (rpm >= 0 and reqs + 1 > rpm) or (tpm >= 0 and toks > 0 and toks + est_t > tpm)
        or (conc >= 0 and streams + 1 > conc) then
      return {'rate', r, reqs, toks, streams}
    end
    i = i + 4
  end
  -- budget lines: counter, limit nano, limit tokens (-1 = none), hard (1/0), ttl s
  local room = nil
  for b = 1, nb do
    if ARGV[i + 3] == '1' then
      local v = redis.call('HMGET', p .. 'bc:' .. ARGV[i], 'sn', 'st', 'rn', 'rt')
      local sn, st = tonumber(v[1] or '0'), tonumber(v[2] or '0')
      local rn, rt = tonumber(v[3] or '0'), tonumber(v[4] or '0')
      local ln, lt = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
      if (ln >= 0 and sn + rn + est_n > ln) or (lt >= 0 and st + rt + est_t > lt) then
        return {'budget', b, v[1] or '0', v[2] or '0', v[3] or '0', v[4] or '0'}
      end
      if ln >= 0 and (room == nil or ln - sn - rn < room) then room = ln - sn - rn end
    end
    i = i + 5
  end
  local rk = p .. 'res:' .. rid
  i = 11
  for r = 1, nr do
    local scope = ARGV[i]
    local mk = p .. 'rm:' .. scope .. ':' .. minute
    redis.call('INCR', mk)
    redis.call('EXPIRE', mk, 120)
    if tonumber(ARGV[i + 2]) >= 0 then
      local tk = p .. 'rt:' .. scope .. ':' .. minute
      redis.call('INCRBY', tk, est_t)
      redis.call('EXPIRE', tk, 120)
      redis.call('HSET', rk, 't:' .. scope .. ':' .. minute, est_t)
    end
    if tonumber(ARGV[i + 3]) >= 0 then
      redis.call('ZADD', p .. 'rc:' .. scope, now + lease, rid)
      redis.call('HSET', rk, 'c:' .. scope, 1)
    end
    i = i + 4
  end
  for b = 1, nb do
    local ck = p .. 'bc:' .. ARGV[i]
    redis.call('HINCRBY', ck, 'rn', est_n)
    redis.call('HINCRBY', ck, 'rt', est_t)
    if tonumber(ARGV[i + 4]) > 0 then redis.call('EXPIRE', ck, ARGV[i + 4]) end
    redis.call('HSET', rk, 'b:' .. ARGV[i], est_n .. ' ' .. est_t)
    i = i + 5
  end
  if redis.call('EXISTS', rk) == 1 then
    redis.call('ZADD', p .. 'leases', now + lease, rid)
    redis.call('PEXPIRE', rk, lease + 60000)
  end
  if room == nil then return {'ok'} end
  return {'ok', string.format('%d', room)}
elseif op == 'settle' then
  -- ARGV[5..7] = cost nano, tokens, #counters; then counter, ttl pairs.
  -- Returns sn, st after the settle for every counter, in order.
  local cost, toks, n = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  release(rid, toks)
  local out = {}
  local i = 8
  for c = 1, n do
    local ck = p .. 'bc:' .. ARGV[i]
    out[#out + 1] = redis.call('HINCRBY', ck, 'sn', cost)
    out[#out + 1] = redis.call('HINCRBY', ck, 'st', toks)
    if tonumber(ARGV[i + 1]) > 0 then redis.call('EXPIRE', ck, ARGV[i + 1]) end
    i = i + 2
  end
  return out
elseif op == 'release' then
  release(rid, 0)
  return {'ok'}
end
return redis.error_reply('unknown op ' .. tostring(op))
