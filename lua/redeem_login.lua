-- redeem_login.lua: bind a WeChat callback's code to the login its state started, once.
-- WeChat sometimes calls the callback twice with the same code and state; the second
-- call must end in the same session, while the state can never serve another code or
-- another browser.
-- KEYS[1] the login (hash: b browser hash, next, c code hash, t session token)  hb:login:{<state>}
-- ARGV[1] sha256 of the caller's pre-login cookie
-- ARGV[2] sha256 of the code
-- returns {result, next, token}:
--   0 unknown or expired state       1 started by another browser
--   2 claimed: exchange the code     3 state already used with another code
--   4 done: reuse token              5 another call is exchanging this code right now

local login = KEYS[1]
local browser_hash, code_hash = ARGV[1], ARGV[2]

local rec = redis.call('HMGET', login, 'b', 'next', 'c', 't')
local b, nxt, c, t = rec[1], rec[2], rec[3], rec[4]
if not b then
  return {0}
end
if b ~= browser_hash then
  return {1}
end
if not c then
  redis.call('HSET', login, 'c', code_hash)
  return {2, nxt}
end
if c ~= code_hash then
  return {3}
end
if t then
  return {4, nxt, t}
end
return {5, nxt}
