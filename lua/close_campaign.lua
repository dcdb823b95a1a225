-- close_campaign.lua: close out an ended campaign, exactly once: what it did not give out
-- returns to the budget, in one ledger record. With ARGV[1] = '1' (an operator's end) it
-- first ends the campaign at Redis's now: the settlement scripts' window check refuses
-- from this call on, and the close-out counts exactly what was granted before it.
-- KEYS[1] campaign meta (hash)                       hb:{<campaign>}:meta
-- KEYS[2] envelope pool (list, red packet)            hb:{<campaign>}:pool
-- KEYS[3] tiers (hash, lottery)                       hb:{<campaign>}:tiers
-- KEYS[4] ledger stream (write-behind to Postgres)    hb:{<campaign>}:ledger
-- ARGV[1] '1' end the campaign now if it has not ended, '0' close out only an ended one
-- returns {status, now_ms, ends_at_ms}
--   status 0 closed out now, 1 no such campaign, 2 not ended yet (ARGV[1] = '0'):
--   nothing done, 3 already closed out: nothing done (a repeated call)
--   ends_at_ms: when the campaign ended (or ends)
-- Writes meta closed_ms and, for a red packet, refunded_count and refunded_fen (k=refund:
-- c envelopes, a fen, e ends_at_ms, t ms); for a lottery, closeout "unreleased:unwon,"
-- per tier in order (k=leftover: r that list, e, t). The meta of a sharded red packet
-- (field pools) holds no envelopes: only closed_ms is written, and no ledger entry (each
-- sub-pool closes out its own envelopes).

local meta, pool, tiers, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local stamp = string.format('%d', now)

local m = redis.call('HMGET', meta, 'kind', 'ends_at_ms', 'closed_ms', 'total_fen', 'won_fen',
  'tier_count', 'pools')
if not m[1] then
  return {1, now, 0}
end
local ends = tonumber(m[2])
if m[3] then
  return {3, now, ends}
end
if now < ends then
  if ARGV[1] ~= '1' then
    return {2, now, ends}
  end
  ends = now
  redis.call('HSET', meta, 'ends_at_ms', stamp)
end
local ended = string.format('%d', ends)

if m[7] then
  redis.call('HSET', meta, 'closed_ms', stamp)
elseif m[1] == 'lottery' then
  -- A tier's slots at or after the end were never released; what was released and not
  -- won is unwon. Schedules are "at_ms:cumulative_release,..." (empty: all at start).
  local parts = {}
  for i = 0, tonumber(m[6]) - 1 do
    local t = redis.call('HMGET', tiers, 'stock:' .. i, 'schedule:' .. i, 'won:' .. i)
    local stock = tonumber(t[1])
    local released = stock
    if t[2] and t[2] ~= '' then
      released = 0
      for at, cum in string.gmatch(t[2], '(%d+):(%d+)') do
        if tonumber(at) >= ends then
          break
        end
        released = tonumber(cum)
      end
    end
    parts[#parts + 1] = string.format('%d:%d,', stock - released,
      released - tonumber(t[3] or '0'))
  end
  local leftover = table.concat(parts)
  redis.call('HSET', meta, 'closed_ms', stamp, 'closeout', leftover)
  redis.call('XADD', ledger, '*', 'k', 'leftover', 'r', leftover, 'e', ended, 't', stamp)
else
  -- The pool holds exactly the envelopes nobody won; their sum is what the won counter
  -- has not taken of the total (O(1), whatever the size of the pool).
  local count = redis.call('LLEN', pool)
  local fen = tonumber(m[4]) - tonumber(m[5] or '0')
  redis.call('HSET', meta, 'closed_ms', stamp, 'refunded_count', count, 'refunded_fen',
    string.format('%d', fen))
  redis.call('XADD', ledger, '*', 'k', 'refund', 'c', count, 'a', string.format('%d', fen),
    'e', ended, 't', stamp)
end
return {0, now, ends}
