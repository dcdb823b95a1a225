-- set_paused.lua: pause or resume a campaign (an operator's call), at most once per change.
-- The settlement scripts read the meta's `paused` in the same HMGET as the window, so the
-- change holds for every worker from this call on; workers learn it for their own
-- pre-checks and views from the events channel.
-- KEYS[1] campaign meta (hash)                     hb:{<campaign>}:meta
-- KEYS[2] ledger stream (write-behind to Postgres)  hb:{<campaign>}:ledger
-- ARGV[1] '1' pause, '0' resume
-- returns {status, now_ms}
--   status 0 changed (and recorded in the ledger: k=pause, p 1|0, t ms), 1 no such
--   campaign, 2 ended (its window has passed, or it was closed out): nothing changes,
--   3 already so: nothing changes (a repeated call)
-- The meta of a sharded red packet (field pools) changes without a ledger entry: its
-- sub-pools' entries record the change.

local meta, ledger = KEYS[1], KEYS[2]
local wanted = ARGV[1]

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local m = redis.call('HMGET', meta, 'ends_at_ms', 'paused', 'closed_ms', 'pools')
if not m[1] then
  return {1, now}
end
if now >= tonumber(m[1]) or m[3] then
  return {2, now}
end
if (m[2] or '0') == wanted then
  return {3, now}
end
redis.call('HSET', meta, 'paused', wanted)
-- PostgreSQL learns the change through the drainers, like a grant: after Redis, retried
-- until it takes it, in stream order.
if not m[4] then
  redis.call('XADD', ledger, '*', 'k', 'pause', 'p', wanted, 't', string.format('%d', now))
end
return {0, now}
