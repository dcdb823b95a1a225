-- take_payout_slot.lua: reserve the next free slot for one call to WeChat Pay.
-- Every payout process shares the limit (GCRA: slots 1/rate apart, whoever takes them).
-- Each call reserves its own slot and sleeps until it, so waiting callers never poll;
-- the caller gives up a slot it woke up too late for, so calls never bunch (see
-- app.payout.ratelimit). A pause one of them set (rate limited, balance not enough)
-- holds all.
-- KEYS[1] the next free slot, Redis µs (string)                 hb:{payout}:rate:<call>
-- KEYS[2] pause, set with a TTL by whoever hit WeChat's limit  hb:{payout}:pause
-- ARGV[1] spacing between calls, µs (1e6 / rate)
-- returns {0, µs until the reserved slot}, or {1, µs of pause left} (nothing reserved)

local spacing = tonumber(ARGV[1])

local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then
  return {1, paused * 1000}
end

-- Redis's clock, not the callers': the processes' clocks may disagree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slot = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
-- %.0f: tostring() would print a µs timestamp in exponent notation.
redis.call('SET', KEYS[1], string.format('%.0f', slot + spacing),
           'PX', math.ceil((slot - now + spacing) / 1000) + 1000)
return {0, slot - now}
