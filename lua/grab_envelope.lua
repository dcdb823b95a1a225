-- grab_envelope.lua: settle a batch of grabs on one red-packet campaign, each user at most once.
-- Concurrent grabs of one campaign are coalesced by the worker into one call of this script.
-- KEYS[1] campaign meta (hash)                     hb:{<campaign>}:meta
-- KEYS[2] envelope pool (list of "seq:amount_fen")  hb:{<campaign>}:pool
-- KEYS[3] winners (hash user -> "seq:amount_fen")  hb:{<campaign>}:winners
-- KEYS[4] ledger stream (write-behind to Postgres)  hb:{<campaign>}:ledger
-- ARGV[1..n] user ids (openids), one per grab
-- returns {status, remaining_count, now_ms, code_1, amount_1, code_2, amount_2, ...}
--   status 0 settled, 1 no such campaign (or still loading), 2 not started, 3 ended
--          (its window has passed, or it was closed out), 4 paused by an operator
--   now_ms: Redis's clock, which decided the window and stamps the ledger entries
--   per user: code 0 won, 1 already won (same amount), 2 sold out; amount 0 when sold out
-- A call that grants nothing and finds the pool empty still writes (HINCRBY meta
-- empty_calls): with REDIS_WAIT_REPLICAS the WAIT after it then confirms that a replica
-- has everything the master did before, the grant that emptied the pool included
-- (replication is in order; which commands advance a connection's WAIT offset varies
-- with Redis versions, a write always does), so a sharded campaign's grab falls through
-- to another sub-pool only once a failover could not refill this one (and so pay a
-- player twice, once in each).

local meta, pool, winners, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

-- One clock for every worker: Redis's. Scripts replicate by their effects (Redis >= 5),
-- so reading TIME before writing is allowed and replicas get the same entries.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local stamp = string.format('%d', now)

-- The meta hash is written only after the whole pool is loaded, so its absence
-- also means "not open yet": nobody can grab a half-loaded campaign.
local window = redis.call('HMGET', meta, 'starts_at_ms', 'ends_at_ms', 'paused', 'closed_ms')
if not window[1] then
  return {1, 0, now}
end
-- Ended wins over everything (an operator's end may come before the start); a campaign
-- closed out stays ended even if Redis's clock stepped back past its end.
if now >= tonumber(window[2]) or window[4] then
  return {3, redis.call('LLEN', pool), now}
end
if now < tonumber(window[1]) then
  return {2, redis.call('LLEN', pool), now}
end
if window[3] == '1' then
  return {4, redis.call('LLEN', pool), now}
end

local out = {0, 0, now}
local won_count, won_fen = 0, 0
local empty = false
for i = 1, #ARGV do
  local user = ARGV[i]
  local prior = redis.call('HGET', winners, user)
  if prior then
    local _, _, amount = string.find(prior, ':(%d+)$')
    out[#out + 1] = 1
    out[#out + 1] = tonumber(amount)
  else
    local envelope = redis.call('LPOP', pool)
    if envelope then
      local _, _, seq, amount = string.find(envelope, '^(%d+):(%d+)$')
      redis.call('HSET', winners, user, envelope)
      redis.call('XADD', ledger, '*', 'u', user, 's', seq, 'a', amount, 't', stamp)
      won_count = won_count + 1
      won_fen = won_fen + tonumber(amount)
      out[#out + 1] = 0
      out[#out + 1] = tonumber(amount)
    else
      empty = true
      out[#out + 1] = 2
      out[#out + 1] = 0
    end
  end
end
if won_count > 0 then
  redis.call('HINCRBY', meta, 'won_count', won_count)
  redis.call('HINCRBY', meta, 'won_fen', won_fen)
elseif empty then
  redis.call('HINCRBY', meta, 'empty_calls', 1)
end
out[2] = redis.call('LLEN', pool)
return out
