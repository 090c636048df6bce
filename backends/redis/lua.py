"""The Lua twins of the `policies` rate-limit algorithms, as script sources.

Why this design: each twin repeats its Python algorithm line by line, in the same order of float
operations and with the same `TIME_EPSILON_S` (substituted below from `policies.quota`), so a
decision made in Redis equals the one `policies` makes on the same state; the differential test
in tests/backends holds them to that. Floats cross the wire as `%.17g` strings both ways (Lua
numbers in a reply are truncated to integers, and 17 significant digits round-trip a double).
The sources live in Python strings rather than `.lua` files so they need no package data.

Each algorithm is a Lua table of functions over a key and `q = {limit, period, burst}`:

- `load(key, q)`: the stored state, or nil (an absent key), in the Python state's shape;
- `decide(q, state, now, cost)`: the decision `{allowed, limit, remaining, retry, reset}` and a
  plan (nil when nothing is to be written: a refusal or a peek);
- `commit(key, q, state, plan, now, floor_ms)`: write the plan and its TTL;
- `refund(key, q, state, now, cost, floor_ms)` and `force(...)`: give back, or take without
  refusing (a settled reservation that ran over), writing their TTL.

Every write is followed in the same script by a PEXPIRE of the algorithm's `ttl_s` in ms,
rounded up, at least `floor_ms`. State shapes: GCRA a string (the TAT); the log a list of
"at:cost" entries, oldest first, at most `limit` of them; the counter a hash {w, c, p, period}
(a state written under another period is read as absent).
"""

from __future__ import annotations

from policies.quota import TIME_EPSILON_S

_PRELUDE = """
redis.replicate_commands()
local EPS = @TIME_EPSILON_S@
local INF = math.huge

local function fmt(x) return string.format('%.17g', x) end

local function clock(arg)
  if arg == '' then
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return tonumber(arg)
end

local function expire(key, ttl_s, floor_ms)
  local ms = math.ceil(ttl_s * 1000)
  if ms < floor_ms then ms = floor_ms end
  redis.call('PEXPIRE', key, string.format('%d', ms))
end

local function nonneg(x) if x < 0 then return 0 end return x end
""".replace("@TIME_EPSILON_S@", repr(TIME_EPSILON_S))

_GCRA = """
local gcra = {}

local function gcra_params(q)
  local interval = q.period / q.limit
  return interval, interval * q.burst
end

local function gcra_decision(q, allowed, tat, now, retry)
  local interval, tau = gcra_params(q)
  local room = now + EPS + tau - tat
  local remaining = math.floor(room / interval)
  if remaining > q.burst then remaining = q.burst end
  return {allowed, q.limit, nonneg(remaining), retry, math.min(tau, nonneg(tat - now))}
end

local function gcra_tat(state, now)
  if state ~= nil and state > now then return state end
  return now
end

local function gcra_write(key, new_tat, now, floor_ms)
  redis.call('SET', key, fmt(new_tat))
  expire(key, nonneg(new_tat - now), floor_ms)
end

function gcra.load(key, q)
  local v = redis.call('GET', key)
  if v then return tonumber(v) end
  return nil
end

function gcra.decide(q, state, now, cost)
  local interval, tau = gcra_params(q)
  local tat = gcra_tat(state, now)
  if cost > q.burst then return gcra_decision(q, false, tat, now, INF), nil end
  local new_tat = tat + interval * cost
  local allow_at = new_tat - tau
  if allow_at > now + EPS then
    return gcra_decision(q, false, tat, now, allow_at - now), nil
  end
  if cost == 0 then return gcra_decision(q, true, tat, now, 0), nil end
  return gcra_decision(q, true, new_tat, now, 0), new_tat
end

function gcra.commit(key, q, state, plan, now, floor_ms)
  gcra_write(key, plan, now, floor_ms)
end

function gcra.refund(key, q, state, now, cost, floor_ms)
  if state == nil or cost == 0 then return end
  local interval = gcra_params(q)
  local new_tat = state - interval * cost
  if now > new_tat then new_tat = now end
  gcra_write(key, new_tat, now, floor_ms)
end

function gcra.force(key, q, state, now, cost, floor_ms)
  local interval = gcra_params(q)
  gcra_write(key, gcra_tat(state, now) + interval * cost, now, floor_ms)
end
"""

_LOG = """
local log = {}

local function log_entry(at, cost) return fmt(at) .. ':' .. string.format('%d', cost) end

local function log_now(state, now)
  local n = #state
  if n > 0 and state[n][1] > now then return state[n][1] end
  return now
end

local function log_first_live(q, state, now)
  for i = 1, #state do
    if state[i][1] + q.period > now + EPS then return i end
  end
  return #state + 1
end

local function log_decision(q, allowed, last_at, used, now, retry)
  local reset = 0
  if last_at ~= nil then reset = last_at + q.period - now end
  return {allowed, q.limit, nonneg(q.limit - used), retry, math.min(q.period, nonneg(reset))}
end

local function log_expire(key, q, last_at, now, floor_ms)
  local eff = now
  if last_at > eff then eff = last_at end
  expire(key, nonneg(last_at + q.period - eff), floor_ms)
end

function log.load(key, q)
  local raw = redis.call('LRANGE', key, 0, -1)
  local state = {}
  for i = 1, #raw do
    local sep = string.find(raw[i], ':', 1, true)
    state[i] = {tonumber(string.sub(raw[i], 1, sep - 1)), tonumber(string.sub(raw[i], sep + 1))}
  end
  return state
end

function log.decide(q, state, now, cost)
  now = log_now(state, now)
  local n = #state
  local first = log_first_live(q, state, now)
  local used = 0
  for i = first, n do used = used + state[i][2] end
  local last_at = nil
  if first <= n then last_at = state[n][1] end
  if cost > q.limit then return log_decision(q, false, last_at, used, now, INF), nil end
  if used + cost > q.limit then
    local needed, freed = used + cost - q.limit, 0
    for i = first, n do
      freed = freed + state[i][2]
      if freed >= needed then
        return log_decision(q, false, last_at, used, now, state[i][1] + q.period - now), nil
      end
    end
  end
  if cost == 0 then return log_decision(q, true, last_at, used, now, 0), nil end
  local plan = {trim = first - 1, merge = false, cost = cost, at = now}
  if last_at ~= nil and last_at == now then
    plan.merge, plan.cost = true, state[n][2] + cost
  end
  return log_decision(q, true, now, used + cost, now, 0), plan
end

function log.commit(key, q, state, plan, now, floor_ms)
  if plan.trim > 0 then redis.call('LTRIM', key, plan.trim, -1) end
  if plan.merge then
    redis.call('LSET', key, -1, log_entry(plan.at, plan.cost))
  else
    redis.call('RPUSH', key, log_entry(plan.at, plan.cost))
  end
  log_expire(key, q, plan.at, now, floor_ms)
end

function log.refund(key, q, state, now, cost, floor_ms)
  local n = #state
  if n == 0 or cost == 0 then return end
  local first = log_first_live(q, state, log_now(state, now))
  if first > 1 then redis.call('LTRIM', key, first - 1, -1) end
  while cost > 0 and n >= first do
    local at, units = state[n][1], state[n][2]
    if units > cost then
      redis.call('LSET', key, -1, log_entry(at, units - cost))
      cost = 0
    else
      redis.call('RPOP', key)
      cost = cost - units
      n = n - 1
    end
  end
  if n >= first then log_expire(key, q, state[n][1], now, floor_ms) end
end

-- Over-limit takes merge into the newest entry once the log holds `limit` entries: the log
-- stays bounded, at the price of those units expiring with that entry.
function log.force(key, q, state, now, cost, floor_ms)
  local n = #state
  local eff = log_now(state, now)
  local first = log_first_live(q, state, eff)
  if first > 1 then redis.call('LTRIM', key, first - 1, -1) end
  local last_at = eff
  if n >= first and (state[n][1] == eff or n - first + 1 >= q.limit) then
    last_at = state[n][1]
    redis.call('LSET', key, -1, log_entry(last_at, state[n][2] + cost))
  else
    redis.call('RPUSH', key, log_entry(eff, cost))
  end
  log_expire(key, q, last_at, now, floor_ms)
end
"""

_COUNTER = """
local counter = {}

local function counter_roll(q, state, now)
  if state ~= nil then
    local start = state.w * q.period
    if start > now then now = start end
  end
  local w = math.floor((now + EPS) / q.period)
  if state == nil then return now, {w = w, c = 0, p = 0} end
  if w <= state.w then return now, state end
  if w == state.w + 1 then return now, {w = w, c = 0, p = state.c} end
  return now, {w = w, c = 0, p = 0}
end

local function counter_threshold(q, window, previous, free)
  if free >= previous then return window * q.period end
  return window * q.period + q.period * (1 - free / previous)
end

local function counter_ttl(q, s, now)
  if s.c > 0 then return nonneg((s.w + 2) * q.period - now) end
  if s.p > 0 then return nonneg((s.w + 1) * q.period - now) end
  return 0
end

local function counter_reset(q, s, now)
  if s.c == 0 and s.p == 0 then return 0 end
  return math.min(q.period, nonneg((s.w + 1) * q.period - now))
end

local function counter_decision(q, allowed, s, now, retry)
  local weight = nonneg(1 - (now + EPS - s.w * q.period) / q.period)  -- as take judges
  if weight > 1 then weight = 1 end
  local estimate = s.p * weight + s.c
  local remaining = math.floor(q.limit - estimate + 1e-9)
  if remaining > q.limit - s.c then remaining = q.limit - s.c end
  return {allowed, q.limit, nonneg(remaining), retry, counter_reset(q, s, now)}
end

local function counter_write(key, q, s, now, floor_ms)
  redis.call('HSET', key, 'w', string.format('%d', s.w), 'c', string.format('%d', s.c),
    'p', string.format('%d', s.p), 'period', fmt(q.period))
  local eff, rolled = counter_roll(q, s, now)
  expire(key, counter_ttl(q, rolled, eff), floor_ms)
end

function counter.load(key, q)
  local v = redis.call('HMGET', key, 'w', 'c', 'p', 'period')
  if not v[1] or tonumber(v[4]) ~= q.period then return nil end
  return {w = tonumber(v[1]), c = tonumber(v[2]), p = tonumber(v[3])}
end

function counter.decide(q, state, now, cost)
  local s
  now, s = counter_roll(q, state, now)
  if cost > q.limit then return counter_decision(q, false, s, now, INF), nil end
  local free = q.limit - s.c - cost
  local threshold_at
  if free < 0 then
    threshold_at = counter_threshold(q, s.w + 1, s.c, q.limit - cost)
  else
    threshold_at = counter_threshold(q, s.w, s.p, free)
  end
  if threshold_at > now + EPS then
    return counter_decision(q, false, s, now, threshold_at - now), nil
  end
  if cost == 0 then return counter_decision(q, true, s, now, 0), nil end
  local taken = {w = s.w, c = s.c + cost, p = s.p}
  return counter_decision(q, true, taken, now, 0), taken
end

function counter.commit(key, q, state, plan, now, floor_ms)
  counter_write(key, q, plan, now, floor_ms)
end

function counter.refund(key, q, state, now, cost, floor_ms)
  if state == nil or cost == 0 then return end
  local _, s = counter_roll(q, state, now)
  local from_current = math.min(cost, s.c)
  local from_previous = math.min(cost - from_current, s.p)
  counter_write(key, q, {w = s.w, c = s.c - from_current, p = s.p - from_previous}, now, floor_ms)
end

function counter.force(key, q, state, now, cost, floor_ms)
  local _, s = counter_roll(q, state, now)
  counter_write(key, q, {w = s.w, c = s.c + cost, p = s.p}, now, floor_ms)
end
"""

_DISPATCH = """
local ALGORITHMS = {gcra = gcra, sliding_log = log, sliding_counter = counter}

local function quota_at(base)
  return {limit = tonumber(ARGV[base]), period = tonumber(ARGV[base + 1]),
    burst = tonumber(ARGV[base + 2])}
end
"""

_TAKE = """
-- KEYS: credits, then per layer (the key's own first): requests state, tokens state.
-- ARGV: now or '', floor_ms, credit_cost (0: no credits), then per layer: enforced (0/1) and
--   for requests and tokens: kind ('' when absent), limit, period, burst, cost.
-- The rule (`scheduler.core.quota_store.admission`): no enforced layer refuses, every layer
-- that fits is taken; only the key's own refuses, credits may pay and the others are taken;
-- else nothing is taken.
-- Reply: admitted, credits spent, credit balance (-1 when not asked), now, then per layer and
--   slot: present, allowed, limit, remaining, retry_after (string), reset_after (string).
local now = clock(ARGV[1])
local floor_ms = tonumber(ARGV[2])
local credit_cost = tonumber(ARGV[3])
local layers = {}
local blocking, key_blocks = 0, false
for l = 1, (#KEYS - 1) / 2 do
  local at = 4 + (l - 1) * 11
  local layer = {slots = {}, fits = true}
  for i = 1, 2 do
    local base = at + 1 + (i - 1) * 5
    local alg = ALGORITHMS[ARGV[base]]
    if alg ~= nil then
      local key = KEYS[2 * l - 1 + i]
      local q = quota_at(base + 1)
      local state = alg.load(key, q)
      local d, plan = alg.decide(q, state, now, tonumber(ARGV[base + 4]))
      layer.slots[i] = {alg = alg, key = key, q = q, state = state, d = d, plan = plan}
      layer.fits = layer.fits and d[1]
    end
  end
  if ARGV[at] == '1' and not layer.fits then
    blocking = blocking + 1
    key_blocks = key_blocks or l == 1
  end
  layers[l] = layer
end
local spent, balance = 0, -1
if credit_cost > 0 then balance = tonumber(redis.call('GET', KEYS[1]) or '0') end
local admitted, from = blocking == 0, 1
if not admitted and blocking == 1 and key_blocks and credit_cost > 0
    and balance >= credit_cost then
  balance = redis.call('DECRBY', KEYS[1], credit_cost)
  spent, admitted, from = credit_cost, true, 2
end
if admitted then
  for l = from, #layers do
    if layers[l].fits then
      for i = 1, 2 do
        local s = layers[l].slots[i]
        if s ~= nil and s.plan ~= nil then
          s.alg.commit(s.key, s.q, s.state, s.plan, now, floor_ms)
        end
      end
    end
  end
end
local reply = {admitted and 1 or 0, spent, balance, fmt(now)}
for l = 1, #layers do
  for i = 1, 2 do
    local s = layers[l].slots[i]
    local fields = {0, 0, 0, 0, '0', '0'}
    if s ~= nil then
      local d = s.d
      fields = {1, d[1] and 1 or 0, d[2], d[3], fmt(d[4]), fmt(d[5])}
    end
    for _, v in ipairs(fields) do reply[#reply + 1] = v end
  end
end
return reply
"""

_SETTLE = """
-- KEYS: credits, then one quota state per entry. ARGV: now or '', floor_ms, then per entry:
--   kind, limit, period, burst, delta (> 0 refunds, < 0 takes without refusing), paid with
--   credits (0/1: the delta goes to or comes out of the credit balance first).
local now = clock(ARGV[1])
local floor_ms = tonumber(ARGV[2])
for e = 2, #KEYS do
  local base = 3 + (e - 2) * 6
  local delta = tonumber(ARGV[base + 4])
  if ARGV[base + 5] == '1' then
    if delta > 0 then
      if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], delta) end
      delta = 0
    else
      local balance = tonumber(redis.call('GET', KEYS[1]) or '0')
      local take = math.min(nonneg(balance), -delta)
      if take > 0 then redis.call('DECRBY', KEYS[1], take) end
      delta = delta + take
    end
  end
  if delta ~= 0 then
    local alg = ALGORITHMS[ARGV[base]]
    local q = quota_at(base + 1)
    local state = alg.load(KEYS[e], q)
    if delta > 0 then
      alg.refund(KEYS[e], q, state, now, delta, floor_ms)
    else
      alg.force(KEYS[e], q, state, now, -delta, floor_ms)
    end
  end
end
return 0
"""

_ADD_CREDITS = """
-- KEYS: credits. ARGV: amount, ttl_ms. The balance expires at the later of its old expiry
-- and ttl_ms from now. Reply: the new balance.
local balance = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return balance
"""

TAKE_SCRIPT = _PRELUDE + _GCRA + _LOG + _COUNTER + _DISPATCH + _TAKE
"""One atomic decision on a key's request and token quotas and the layers it shares (its
tenant's, its model's), spending the key's credits when only its own quotas refuse."""

SETTLE_SCRIPT = _PRELUDE + _GCRA + _LOG + _COUNTER + _DISPATCH + _SETTLE
"""Settle a reservation against the real usage (or give a request back), on every layer."""

ADD_CREDITS_SCRIPT = _ADD_CREDITS
"""Add burst credits to a key's balance."""
