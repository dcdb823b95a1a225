-- draw_prize.lua: settle a batch of lottery draws on one campaign; each draw is atomic with
-- its quota check, its stock check, its win, its ledger record and its replay record.
-- Concurrent draws of one campaign are coalesced by the worker into one call of this script.
-- KEYS[1] campaign meta (hash: window, kind, quotas, when_out)  hb:{<campaign>}:meta
-- KEYS[2] tiers (hash weight:i stock:i schedule:i won:i)          hb:{<campaign>}:tiers
-- KEYS[3] draws per player (hash openid -> draws so far)          hb:{<campaign>}:draws
-- KEYS[4] draws per player on ARGV[1]'s day (hash openid -> n)    hb:{<campaign>}:daily:<day>
-- KEYS[5] draws per day (hash day -> n, "won:"..day -> prizes)    hb:{<campaign>}:days
-- KEYS[6] prizes per player (hash openid -> "n:tier,n:tier,...")  hb:{<campaign>}:wins
-- KEYS[7] ledger stream (write-behind to Postgres)                hb:{<campaign>}:ledger
-- KEYS[8..] replay records, one per idempotency key in the batch  hb:{<campaign>}:replay:<openid>:<key>
-- ARGV[1] the day KEYS[4] counts, YYYYMMDD in Asia/Shanghai (the worker's guess of today)
-- ARGV[2] how long a replay record is kept, seconds
-- ARGV[3], ARGV[4], ARGV[5] / ARGV[6], ... per draw: openid, random integer in [0, 2^52),
--   index in KEYS of its replay record (0: the draw carries no idempotency key)
-- returns {status, now_ms, day, code_1, tier_1, draw_no_1, code_2, tier_2, draw_no_2, ...}
--   status 0 settled, 1 no such campaign (or still loading), 2 not started, 3 ended,
--          4 not a lottery, 5 ARGV[1] is not today: nothing done, call again with `day`,
--          6 paused by an operator (3 also once closed out: ended wins over everything)
--   now_ms and day: Redis's clock and its day in Asia/Shanghai, which decided everything
--   per draw: code 0 prize (tier >= 0), 1 no prize, 2 total quota used up, 3 daily quota
--   used up; tier -1 unless a prize; draw_no is the player's draw number (0 when refused).
--   A draw whose replay record exists is not drawn again: it answers the recorded draw.

local meta, tiers, draws, daily, days, wins, ledger =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local replay_ttl = tonumber(ARGV[2])

-- YYYYMMDD of unix milliseconds in Asia/Shanghai. China has kept UTC+8 all year since
-- 1991 (no DST), so a fixed offset is exact; days to civil date as in H. Hinnant's
-- "chrono-compatible low-level date algorithms".
local function shanghai_day(ms)
  local z = math.floor((ms + 28800000) / 86400000) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return y * 10000 + m * 100 + d
end

-- One clock for every worker: Redis's (scripts replicate by their effects, Redis >= 5).
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local stamp = string.format('%d', now)
local today_n = shanghai_day(now)
local day = string.format('%d', today_n)

local m = redis.call('HMGET', meta, 'starts_at_ms', 'ends_at_ms', 'kind', 'tier_count',
  'no_prize_weight', 'quota_total', 'quota_daily', 'when_out', 'paused', 'closed_ms')
if not m[1] then
  return {1, now, today_n}
end
if m[3] ~= 'lottery' then
  return {4, now, today_n}
end
-- Ended wins over everything (an operator's end may come before the start).
if now >= tonumber(m[2]) or m[10] then
  return {3, now, today_n}
end
if now < tonumber(m[1]) then
  return {2, now, today_n}
end
if m[9] == '1' then
  return {6, now, today_n}
end
-- The worker named the daily key from its own clock; only Redis's day counts.
if ARGV[1] ~= day then
  return {5, now, today_n}
end
local tier_count = tonumber(m[4])
local no_prize_weight = tonumber(m[5])
local quota_total = tonumber(m[6])   -- 0: no lifetime cap
local quota_daily = tonumber(m[7])   -- 0: no daily cap
local renormalise = m[8] == 'renormalise'

-- Per tier: weight and what is left to win now (released by `now` minus won).
-- A schedule is "at_ms:cumulative_release,..." in time order; empty means all stock at start.
local weight, left, value = {}, {}, {}
for i = 0, tier_count - 1 do
  local t = redis.call('HMGET', tiers, 'weight:' .. i, 'stock:' .. i, 'schedule:' .. i,
    'won:' .. i, 'value:' .. i)
  local released = tonumber(t[2])
  if t[3] ~= '' then
    released = 0
    for at, cum in string.gmatch(t[3], '(%d+):(%d+)') do
      if tonumber(at) > now then
        break
      end
      released = tonumber(cum)
    end
  end
  weight[i] = tonumber(t[1])
  left[i] = released - tonumber(t[4] or '0')
  value[i] = t[5]
end

local out = {0, now, today_n}
local won_today = 0
for a = 3, #ARGV, 3 do
  local user, rand, replay_at = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local replay = replay_at > 0 and KEYS[replay_at] or nil
  local recorded = replay and redis.call('GET', replay)
  local so_far = tonumber(redis.call('HGET', draws, user) or '0')
  local today = tonumber(redis.call('HGET', daily, user) or '0')
  if recorded then
    -- A retry of a draw already made (its reply was lost): the same answer, no new draw.
    for field in string.gmatch(recorded, '(-?%d+)') do
      out[#out + 1] = tonumber(field)
    end
  elseif quota_total > 0 and so_far >= quota_total then
    out[#out + 1] = 2
    out[#out + 1] = -1
    out[#out + 1] = 0
  elseif quota_daily > 0 and today >= quota_daily then
    out[#out + 1] = 3
    out[#out + 1] = -1
    out[#out + 1] = 0
  else
    -- Pick by weight with integer arithmetic: totals stay below 2^31 and rand below 2^52,
    -- so every number here is an exact double and fmod is exact.
    local total = no_prize_weight
    for i = 0, tier_count - 1 do
      if left[i] > 0 or not renormalise then
        total = total + weight[i]
      end
    end
    local picked = -1
    if total > 0 then
      local x = math.fmod(rand, total)
      for i = 0, tier_count - 1 do
        if left[i] > 0 or not renormalise then
          if x < weight[i] then
            picked = i
            break
          end
          x = x - weight[i]
        end
      end
    end
    -- Under "fallback" a tier that is out (or not yet released) turns the pick into no prize.
    if picked >= 0 and left[picked] <= 0 then
      picked = -1
    end
    local draw_no = redis.call('HINCRBY', draws, user, 1)
    redis.call('HINCRBY', daily, user, 1)
    redis.call('HINCRBY', days, day, 1)
    local amount = '0'
    if picked >= 0 then
      left[picked] = left[picked] - 1
      redis.call('HINCRBY', tiers, 'won:' .. picked, 1)
      local prior = redis.call('HGET', wins, user) or ''
      redis.call('HSET', wins, user, prior .. draw_no .. ':' .. picked .. ',')
      won_today = won_today + 1
      amount = value[picked]
    end
    redis.call('XADD', ledger, '*', 'k', 'draw', 'u', user, 'n', draw_no, 'p', picked,
      'a', amount, 't', stamp, 'd', day)
    local code = picked >= 0 and 0 or 1
    if replay then
      redis.call('SET', replay, code .. ':' .. picked .. ':' .. draw_no, 'EX', replay_ttl)
    end
    out[#out + 1] = code
    out[#out + 1] = picked
    out[#out + 1] = draw_no
  end
end
if won_today > 0 then
  redis.call('HINCRBY', days, 'won:' .. day, won_today)
end
return out
