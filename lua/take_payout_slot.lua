-- take_payout_slot.lua: let one call to WeChat Pay go now, or say how long to wait.
-- Every payout process shares the limit (GCRA: calls are spaced 1/rate apart, whoever
-- makes them), and a pause one of them set (rate limited, balance not enough) holds all.
-- KEYS[1] theoretical arrival time of the next call, µs (string)  hb:{payout}:rate:<call>
-- KEYS[2] pause, set with a TTL by whoever hit WeChat's limit     hb:{payout}:pause
-- ARGV[1] spacing between calls, µs (1e6 / rate)
-- returns 0 to go now, else the µs to wait before asking again

local spacing = tonumber(ARGV[1])

local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then
  return paused * 1000
end

-- Redis's clock, not the caller's: the processes' clocks may disagree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > now then
  return math.ceil(tat - now)
end
-- %.0f: tostring() would print a µs timestamp in exponent notation.
redis.call('SET', KEYS[1], string.format('%.0f', now + spacing), 'PX', math.ceil(spacing / 1000) + 1000)
return 0
