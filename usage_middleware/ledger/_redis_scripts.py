"""The Lua scripts of :class:`~usage_middleware.ledger.redis.RedisLedger`.

Each script runs atomically inside Redis (one ``EVALSHA``, usually pipelined with others)
and touches only the keys it is given, all of one customer (one hash tag, so one Redis
Cluster slot; :data:`CHANGED`'s keys share the change log's tag ``{~}``). Times are
the server's (``TIME``, milliseconds), so replicas with skewed clocks agree on expiry.
Scripts write effects only (Redis >= 5 replicates script effects), so ``TIME`` is allowed.

Keys of customer ``C`` under prefix ``P`` (see
:func:`~usage_middleware.ledger.redis.customer_keys`):

* ``P{C}:sub``            hash: ``plan`` (the subscribed plan), ``since`` (ISO 8601).
* ``P{C}:credits``        hash: ``+<feature>`` units credited, ``-<feature>`` units consumed
                          (balance = credited - consumed, as the SQLite ledger).
* ``P{C}:usage``          hash: ``<feature>@<period>`` -> units charged in that period
                          (``period`` like ``2026-11-01/2026-12-01``).
* ``P{C}:lease:<feature>`` hash of the live leases of every process: field
                          ``<owner>|<period>`` -> ``<units>|<expiry>|<seq>`` (server ms;
                          ``seq``: see :data:`LEASE`, absent in older records). An
                          expired record is dead (deleted when met); the key's own TTL is
                          past its last record's expiry, so an idle hash vanishes whole.
* ``P{C}:gc``             hash of group-commit markers: field ``<batch>`` (a group commit
                          applied whole) or ``<batch>|<feature>|<period>`` (one entry
                          replayed from the spool). The whole hash expires
                          ``idempotency_ttl`` after its last write, and each group commit
                          deletes the markers of this owner's earlier ones whose reply
                          arrived, so it holds a few fields per customer, not one per
                          request.
* ``P{C}:ik:<key>``       idempotency marker of an event charged by :data:`CHARGE` (a
                          reported event, or one served while Redis was unreachable;
                          ``PX`` = the idempotency window).
* ``P{~}:generation``, ``P{~}:changes``: a counter bumped by every admin write, and a
                          sorted set customer -> the generation of its last change, which
                          each process polls once a tick.

The plan terms come from the caller as ONE argument, the *terms* (fewer arguments to
encode: cheaper on the client): lines joined by ``\n``, first the four period keys of the
moment being checked or charged (day, week, month, year), then for every plan of the
pricing three lines ``plan``, ``limit`` (``-1`` = unlimited, empty = the plan lacks the
feature) and ``interval`` (1-4 = day, week, month, year). A customer whose plan is not in
the terms gets limit 0 on the monthly period (as the SQLite ledger).
"""

from __future__ import annotations

__all__ = ["CHANGED", "CHARGE", "FLUSH", "GIVE", "GRANT", "LEASE", "RENEW", "USAGE"]

# Shared Lua helpers, prepended to the scripts that need them.
_COMMON = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Keep a lease hash alive until after its last record expires.
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

-- A whole number as text (never 1e+15 notation).
local function fmt(n)
  return string.format('%.0f', n)
end

-- One lease record: field '<owner>|<period>' of a lease hash, value
-- '<units>|<expiry ms>|<seq>' (seq: the owner's last reconciling call, absent = 0).
-- Its live units, expiry and seq (0s when absent; an expired record is deleted).
local function record(key, field, now)
  local v = redis.call('HGET', key, field)
  if not v then return 0, 0, 0 end
  local units, expiry, seq = string.match(v, '^(%d+)|(%d+)|?(%d*)$')
  if tonumber(expiry) <= now then
    redis.call('HDEL', key, field)
    return 0, 0, 0
  end
  return tonumber(units), tonumber(expiry), tonumber(seq) or 0
end

local function encode(units, expiry, seq)
  return fmt(units) .. '|' .. fmt(expiry) .. '|' .. fmt(seq)
end

-- Take n units off a live lease record (deleted at 0); never revives an expired one.
-- With seq (the owner's seq when the units left its memory): nothing if a LEASE of a
-- later seq reconciled the record (it counted them given back already).
local function shrink(key, field, n, now, seq)
  local units, expiry, last = record(key, field, now)
  if units == 0 then return 0 end
  if seq and last > seq then return units end
  units = units - n
  if units <= 0 then
    redis.call('HDEL', key, field)
    return 0
  end
  redis.call('HSET', key, field, encode(units, expiry, last))
  return units
end
"""

#: Charge an event (a reported one, or one served while Redis was unreachable), once per
#: idempotency key. KEYS: sub, credits, usage, marker. ARGV: feature, units, clobber
#: ('1'/'0'), marker_ttl_ms, terms (of the event's time).
#: Returns {status, used, balance}: 1 charged, 0 already charged (nothing done), -1 unknown
#: customer (nothing done).
CHARGE = (
    _COMMON
    + r"""
local feature, units, clobber = ARGV[1], ARGV[2], ARGV[3]
local lines = split(ARGV[5])
local known, plan, limit, interval = terms(KEYS[1], KEYS[2], lines, 5)
local period = lines[interval]
if redis.call('EXISTS', KEYS[4]) == 1 then return {0, 0, 0} end
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
redis.call('SET', KEYS[4], '1', 'PX', ARGV[4])
return {1, reply(new), reply(balance_of(KEYS[2], feature))}
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

#: Lease units for one (customer, feature): give back, reconcile this owner's record with
#: what the owner holds, then grant as LedgerStore.lease does.
#: KEYS: sub, credits, usage, lease, gc. ARGV: feature, owner, need, want, ttl_ms, terms,
#: seq, then the units this owner holds of its record of each of the 4 periods of the terms
#: (day, week, month, year; its memory: free, held, charged not yet handed to a group
#: commit), n_shares, then n_shares triples (batch, period, leased): lease-funded units of
#: this owner's group commits whose reply did not arrive (counted held unless their marker
#: shows them applied), then pairs (period, units) to give back first.
#: The record of the period is set to min(stored, held + unapplied shares) + take: units a
#: lost reply left in it (a lease that ran, a give-back that did not) go back to the pool.
#: A call whose seq is not above the record's (a lost call run late) changes nothing.
#: Returns {status, limit, used, balance, others, take, spare, roomy, interval, in_plan,
#: mine, applied}: status -1 unknown customer (nothing else set), 1 otherwise; limit -1
#: unlimited (nothing leased); others = units of this period's capacity held by other live
#: leases (and the credits this owner's leases of other periods may still consume); take =
#: units added to this owner's lease; spare = units still free after it; roomy 1 when spare
#: is at least 4 blocks; interval = the index (1-4) of the period in the terms; mine = this
#: owner's lease of the period after this call; applied = the (0-based) indexes of the
#: shares found applied.
LEASE = (
    _COMMON
    + r"""
local feature, owner = ARGV[1], ARGV[2]
local need, want, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local seq, n_shares = tonumber(ARGV[7]), tonumber(ARGV[12])
local now = now_ms()
for i = 13 + 3 * n_shares, #ARGV, 2 do
  shrink(KEYS[4], owner .. '|' .. ARGV[i], tonumber(ARGV[i + 1]), now, seq)
end
local lines = split(ARGV[6])
local known, plan, limit, interval, in_plan = terms(KEYS[1], KEYS[2], lines, 5)
if not known then return {-1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, {}} end
local flag = 0
if in_plan then flag = 1 end
local period = lines[interval]
local used = tonumber(redis.call('HGET', KEYS[3], feature .. '@' .. period) or '0')
local balance = balance_of(KEYS[2], feature)
if limit < 0 then return {1, -1, reply(used), reply(balance), 0, 0, 0, 0, interval, flag, 0, {}} end
local credits = balance
if credits < 0 then credits = 0 end
local held, mine, last = {}, 0, 0
local all = redis.call('HGETALL', KEYS[4])
for i = 1, #all, 2 do
  local who, p = string.match(all[i], '^(.*)|([^|]*)$')
  local units, expiry, s = string.match(all[i + 1], '^(%d+)|(%d+)|?(%d*)$')
  if tonumber(expiry) <= now then
    redis.call('HDEL', KEYS[4], all[i])
  elseif who == owner and p == period then
    mine, last = tonumber(units), tonumber(s) or 0
  else
    held[p] = (held[p] or 0) + tonumber(units)
  end
end
local fresh = seq > last
local applied = {}
if fresh then
  local target = tonumber(ARGV[7 + interval])
  for j = 0, n_shares - 1 do
    local b, p = ARGV[13 + 3 * j], ARGV[14 + 3 * j]
    if redis.call('HEXISTS', KEYS[5], b) == 1
        or redis.call('HEXISTS', KEYS[5], b .. '|' .. feature .. '|' .. p) == 1 then
      applied[#applied + 1] = j
    elseif p == period then
      target = target + tonumber(ARGV[15 + 3 * j])
    end
  end
  if mine > target then mine = target end
end
local others = held[period] or 0
held[period] = nil
for p, units in pairs(held) do  -- leases of another period (a rollover) may use credits
  local used_then = tonumber(redis.call('HGET', KEYS[3], feature .. '@' .. p) or '0')
  others = others + overage(used_then + units, limit) - overage(used_then, limit)
end
local free = limit - used
if free < 0 then free = 0 end
free = free + credits - others - mine
local take = 0
if fresh and need <= free then
  take = math.min(free, math.max(need, math.min(want, math.floor(free / 4))))
end
local spare = free - take
if spare < 0 then spare = 0 end
local roomy = 0
if spare >= 4 * want then roomy = 1 end
if fresh then
  -- (a record of 0 units keeps the seq until it expires: a late call stays stale)
  redis.call('HSET', KEYS[4], owner .. '|' .. period, encode(mine + take, now + ttl, seq))
  keep(KEYS[4], ttl)
end
return {1, limit, reply(used), reply(balance), reply(others), reply(take), reply(spare), roomy,
        interval, flag, reply(mine + take), applied}
"""
)

#: One customer's share of a group commit, once per batch: add each entry's units to the
#: period's usage (the overage beyond the limit consumes credits) and take its lease-funded
#: units off the owner's lease. KEYS: credits, usage, gc, then one lease key per entry.
#: ARGV: owner, batch, marker_ttl_ms, replay ('1': entries replayed from the spool, marked
#: one by one), n_acks, the n_acks markers to delete (earlier batches whose reply arrived),
#: then per entry: feature, period, limit (-1 unlimited), units, leased.
#: Returns {1, used, balance, ...} (per entry, after it), or {0} if the batch was applied.
FLUSH = (
    _COMMON
    + r"""
local owner, batch, ttl, replay = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local acks = tonumber(ARGV[5])
if redis.call('HEXISTS', KEYS[3], batch) == 1 then return {0} end
local now = now_ms()
local out = {1}
local k = 4
for i = 6 + acks, #ARGV, 5 do
  local feature, period = ARGV[i], ARGV[i + 1]
  local limit, leased = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 4])
  local field = feature .. '@' .. period
  local mark = batch .. '|' .. feature .. '|' .. period
  local used
  if redis.call('HEXISTS', KEYS[3], mark) == 0 then
    local old = tonumber(redis.call('HGET', KEYS[2], field) or '0')
    used = incr_capped(KEYS[2], field, ARGV[i + 3])
    local delta = overage(used, limit) - overage(old, limit)
    if delta > 0 then incr_capped(KEYS[1], '-' .. feature, delta) end
    if leased > 0 then shrink(KEYS[k], owner .. '|' .. period, leased, now) end
    if replay == '1' then redis.call('HSET', KEYS[3], mark, '1') end
  else
    used = tonumber(redis.call('HGET', KEYS[2], field) or '0')
  end
  out[#out + 1] = reply(used)
  out[#out + 1] = reply(balance_of(KEYS[1], feature))
  k = k + 1
end
if acks > 0 then redis.call('HDEL', KEYS[3], unpack(ARGV, 6, 5 + acks)) end
if replay ~= '1' then redis.call('HSET', KEYS[3], batch, '1') end
redis.call('PEXPIRE', KEYS[3], ttl)
return out
"""
)

#: Give back units of this owner's leases (never reviving an expired record; nothing when
#: a LEASE of a later seq reconciled the record: it counted them given).
#: KEYS: one lease key per entry. ARGV: owner, seq, then per entry: period, units.
#: Returns the units left per entry.
GIVE = (
    _COMMON
    + r"""
local now = now_ms()
local seq = tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS do
  out[i] = reply(shrink(KEYS[i], ARGV[1] .. '|' .. ARGV[2 * i + 1], tonumber(ARGV[2 * i + 2]),
                        now, seq))
end
return out
"""
)

#: Renew this owner's live lease records. KEYS: one lease key per record. ARGV: owner,
#: ttl_ms, then the period of each record. Returns per record 1 (renewed) or 0 (gone:
#: expired or given back; never revived, its units may have gone to others meanwhile).
RENEW = (
    _COMMON
    + r"""
local owner, ttl = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local out = {}
for i = 1, #KEYS do
  local field = owner .. '|' .. ARGV[i + 2]
  local units, _, last = record(KEYS[i], field, now)
  if units > 0 then
    redis.call('HSET', KEYS[i], field, encode(units, now + ttl, last))
    keep(KEYS[i], ttl)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
)

#: Note admin writes for the other processes. KEYS: generation, changes. ARGV: customers.
#: Returns the new generation.
CHANGED = r"""
local generation = redis.call('INCR', KEYS[1])
for i = 1, #ARGV do redis.call('ZADD', KEYS[2], generation, ARGV[i]) end
return generation
"""
