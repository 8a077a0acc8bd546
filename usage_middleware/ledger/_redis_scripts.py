"""The Lua scripts of :class:`~usage_middleware.ledger.redis.RedisLedger`.

Each script runs atomically inside Redis (one ``EVALSHA`` round trip) and touches only the
keys it is given, all of one customer (one hash tag, so one Redis Cluster slot). Times are
the server's (``TIME``, milliseconds), so replicas with skewed clocks agree on expiry.
Scripts write effects only (Redis >= 5 replicates script effects), so ``TIME`` is allowed.

Keys of customer ``C`` under prefix ``P`` (see :func:`~usage_middleware.ledger.redis.keys`):

* ``P{C}:sub``            hash: ``plan`` (the subscribed plan), ``since`` (ISO 8601).
* ``P{C}:credits``        hash: ``+<feature>`` units credited, ``-<feature>`` units consumed
                          (balance = credited - consumed, as the SQLite ledger).
* ``P{C}:usage``          hash: ``<feature>@<period>`` -> units charged in that period
                          (``period`` like ``2026-11-01/2026-12-01``).
* ``P{C}:holds:<feature>`` sorted set of live reservations: member
                          ``<units>:<period>:<id>`` scored by its expiry (server ms), and
                          per period a member ``=<period>`` scored ``-total`` (the units of
                          that period's holds, kept so a check costs O(1)). The key's own
                          TTL is past its last hold's expiry, so an idle set vanishes whole.
* ``P{C}:ik:<key>``       idempotency marker of a charged event (``PX`` = the idempotency
                          window); a charge whose marker exists is not applied again.

The plan terms come from the caller as ONE argument, the *terms* (fewer arguments to
encode: cheaper on the client): lines joined by ``\n``, first the four period keys of the
moment being checked or charged (day, week, month, year), then for every plan of the
pricing three lines ``plan``, ``limit`` (``-1`` = unlimited, empty = the plan lacks the
feature) and ``interval`` (1-4 = day, week, month, year). A customer whose plan is not in
the terms gets limit 0 on the monthly period (as the SQLite ledger).
"""

from __future__ import annotations

__all__ = ["CHARGE", "GRANT", "RELEASE", "RENEW", "RESERVE", "USAGE"]

# Shared Lua helpers, prepended to the scripts that need them.
_COMMON = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Add n (may be negative) to a period's held total (member '=<period>', score -total).
local function add_held(key, period, n)
  local sentinel = redis.call('ZSCORE', key, '=' .. period)
  local total = n
  if sentinel then total = total - tonumber(sentinel) end
  if total > 0 then
    redis.call('ZADD', key, -total, '=' .. period)
  else
    redis.call('ZREM', key, '=' .. period)
  end
end

-- Drop the expired members of a holds set (and their units from the totals).
local function expire(key, now)
  local expired = redis.call('ZRANGEBYSCORE', key, '(0', now)
  if #expired == 0 then return end
  local freed = {}
  for i = 1, #expired do
    local units, period = string.match(expired[i], '^(%d+):([^:]*):')
    freed[period] = (freed[period] or 0) + tonumber(units)
  end
  redis.call('ZREMRANGEBYSCORE', key, '(0', now)
  for period, units in pairs(freed) do add_held(key, period, -units) end
end

-- Remove one hold; whether it was there.
local function unhold(key, member)
  if redis.call('ZREM', key, member) == 0 then return false end
  local units, period = string.match(member, '^(%d+):([^:]*):')
  add_held(key, period, -tonumber(units))
  return true
end

-- Keep an idle holds set alive until after its last member expires.
local function keep(key, ttl)
  if redis.call('PTTL', key) < ttl + 1000 then
    redis.call('PEXPIRE', key, ttl + 1000)
  end
end

-- The lines of a terms argument.
local function split(s)
  local t, i = {}, 1
  while true do
    local j = string.find(s, '\n', i, true)
    if not j then
      t[#t + 1] = string.sub(s, i)
      return t
    end
    t[#t + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end

-- The customer's terms for a feature: known, plan (or false), limit, interval index,
-- in_plan. limit: -1 unlimited, else units (0 when the plan lacks the feature).
local function terms(sub_key, credits_key, argv, first)
  local plan = redis.call('HGET', sub_key, 'plan')
  if not plan then
    if redis.call('EXISTS', credits_key) == 0 then return false end
    return true, false, 0, 3, false
  end
  for i = first, #argv, 3 do
    if argv[i] == plan then
      if argv[i + 1] == '' then return true, plan, 0, tonumber(argv[i + 2]), false end
      return true, plan, tonumber(argv[i + 1]), tonumber(argv[i + 2]), true
    end
  end
  return true, plan, 0, 3, false
end

local function balance_of(credits_key, feature)
  local c = redis.call('HMGET', credits_key, '+' .. feature, '-' .. feature)
  return (tonumber(c[1]) or 0) - (tonumber(c[2]) or 0)
end

-- Redis integers are 64-bit: a total stops at 2^63-1 (MAX_TEXT) instead of failing the
-- script. Lua numbers are doubles, where 2^63-1 reads as 2^63 (MAX).
local MAX_TEXT = '9223372036854775807'
local MAX = tonumber(MAX_TEXT)

-- HINCRBY, clamped at 2^63-1 when it would overflow; the new value.
local function incr_capped(key, field, n)
  local r = redis.pcall('HINCRBY', key, field, n)
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'overflow', 1, true) then error(r) end
    redis.call('HSET', key, field, MAX_TEXT)
    return MAX
  end
  return r
end

-- A number for a reply: Redis casts a Lua number to a 64-bit integer, which 2^63 is not;
-- the clamped total is returned as its decimal text instead.
local function reply(n)
  if n >= MAX then return MAX_TEXT end
  return n
end

local function overage(used, limit)
  if limit < 0 or used <= limit then return 0 end
  return used - limit
end
"""

#: Check (and with a hold id, hold) units.
#: KEYS: sub, credits, usage, holds. ARGV: feature, units, hold id ('' = check only),
#: ttl_ms, terms.
#: Returns {status, limit, used, balance, held, period, in_plan}: status 1 allowed (held),
#: 0 refused, -1 unknown customer; limit -1 = unlimited; balance = credits (may be < 0);
#: held = units this period's capacity cannot give (live holds, this one included, and
#: the credits that holds of another period may still consume).
RESERVE = (
    _COMMON
    + r"""
local feature, units, id, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local lines = split(ARGV[5])
local known, plan, limit, interval, in_plan = terms(KEYS[1], KEYS[2], lines, 5)
if not known then return {-1, 0, 0, 0, 0, '', 0} end
local period = lines[interval]
local used = tonumber(redis.call('HGET', KEYS[3], feature .. '@' .. period) or '0')
local balance = balance_of(KEYS[2], feature)
local flag = 0
if in_plan then flag = 1 end
if limit < 0 then return {1, -1, reply(used), reply(balance), 0, period, flag} end
local now = now_ms()
expire(KEYS[4], now)
local held = 0
local totals = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', 0, 'WITHSCORES')
for i = 1, #totals, 2 do
  local other = string.sub(totals[i], 2)
  local units_held = -tonumber(totals[i + 1])
  if other == period then
    held = held + units_held
  else  -- a hold from another period (a rollover) may still consume credits
    local used_then = tonumber(redis.call('HGET', KEYS[3], feature .. '@' .. other) or '0')
    held = held + overage(used_then + units_held, limit) - overage(used_then, limit)
  end
end
local member = units .. ':' .. period .. ':' .. id
if id ~= '' and redis.call('ZSCORE', KEYS[4], member) then  -- a retried call: held already
  return {1, limit, reply(used), reply(balance), held, period, flag}
end
local credits = balance
if credits < 0 then credits = 0 end
local free = limit - used
if free < 0 then free = 0 end
free = free + credits - held
if units > free then return {0, limit, reply(used), reply(balance), held, period, flag} end
if id ~= '' then
  redis.call('ZADD', KEYS[4], now + ttl, member)
  add_held(KEYS[4], period, units)
  held = held + units
  keep(KEYS[4], ttl)
end
return {1, limit, reply(used), reply(balance), held, period, flag}
"""
)

#: Charge an event (commit of a reservation, or a reported event), once per idempotency key.
#: KEYS: sub, credits, usage, holds, marker. ARGV: feature, units, clobber ('1'/'0'),
#: the hold to drop (member; '' = the one this event would have made: units, period of its
#: time, key), the event's idempotency key, marker_ttl_ms, terms (of the event's time).
#: Returns {status, used, balance}: 1 charged, 0 already charged (nothing done), -1 unknown
#: customer (nothing done).
CHARGE = (
    _COMMON
    + r"""
local feature, units, clobber, member = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lines = split(ARGV[7])
local known, plan, limit, interval = terms(KEYS[1], KEYS[2], lines, 5)
local period = lines[interval]
if member == '' then member = units .. ':' .. period .. ':' .. ARGV[5] end
unhold(KEYS[4], member)
if redis.call('EXISTS', KEYS[5]) == 1 then return {0, 0, 0} end
if not known then return {-1, 0, 0} end
local field = feature .. '@' .. period
local old = tonumber(redis.call('HGET', KEYS[3], field) or '0')
local new
if clobber == '1' then
  redis.call('HSET', KEYS[3], field, units)
  new = tonumber(units)
else
  new = incr_capped(KEYS[3], field, units)
end
local delta = overage(new, limit) - overage(old, limit)
if delta > 0 then
  incr_capped(KEYS[2], '-' .. feature, delta)
elseif delta < 0 then
  -- HINCRBY, not HSET of a computed double (which Lua would write as 1e+17 text)
  local consumed = tonumber(redis.call('HGET', KEYS[2], '-' .. feature) or '0')
  if consumed + delta <= 0 then
    if consumed > 0 then redis.call('HSET', KEYS[2], '-' .. feature, 0) end
  else
    redis.call('HINCRBY', KEYS[2], '-' .. feature, delta)
  end
end
redis.call('SET', KEYS[5], '1', 'PX', ARGV[6])
return {1, reply(new), reply(balance_of(KEYS[2], feature))}
"""
)

#: Give a hold back. KEYS: holds. ARGV: member. Returns 1 if it was held, else 0.
RELEASE = (
    _COMMON
    + r"""
if unhold(KEYS[1], ARGV[1]) then return 1 end
return 0
"""
)

#: Push the expiry of live holds forward. KEYS: holds. ARGV: ttl_ms, members...
#: Returns the members that were no longer held (expired or gone: never re-added, since
#: their units may have been taken meanwhile).
RENEW = (
    _COMMON
    + r"""
local ttl = tonumber(ARGV[1])
local now = now_ms()
local gone = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
  else
    gone[#gone + 1] = ARGV[i]
  end
end
if #gone < #ARGV - 1 then keep(KEYS[1], ttl) end
return gone
"""
)

#: Credit units (the credited sum stops at 2**63-1). KEYS: credits. ARGV: feature, units.
#: Returns {credited, consumed} as the stored decimal texts (exact: Lua numbers are
#: doubles, which cannot subtract totals near 2**63); the balance is their difference.
GRANT = (
    _COMMON
    + r"""
incr_capped(KEYS[1], '+' .. ARGV[1], ARGV[2])
return {redis.call('HGET', KEYS[1], '+' .. ARGV[1]),
        redis.call('HGET', KEYS[1], '-' .. ARGV[1]) or '0'}
"""
)

#: A consistent read of a customer. KEYS: sub, credits, usage.
#: Returns {plan or false, credits hash as a flat list, usage hash as a flat list}.
USAGE = r"""
return {redis.call('HGET', KEYS[1], 'plan'), redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3])}
"""
