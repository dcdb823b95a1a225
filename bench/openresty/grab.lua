-- grab.lua: the grab path of the OpenResty comparison (bench/openresty/nginx.conf).
-- POST /api/campaigns/<id>/grab, cookie hb_session=<openid>.<expires, unix s>.<mac>,
--   mac = base64url(HMAC-SHA1(HB_COOKIE_KEY, "<openid>.<expires>")), unpadded
--   (bench/openresty.py mints these for the bench's players).
-- One EVALSHA of our own lua/grab_envelope.lua per grab, over each worker's keepalive
-- pool of Redis connections, speaking RESP itself: Debian packages no lua-resty-redis.
-- Answers as our grab route does: 200 {"result":"won"|"already_won","amount_fen":N} or
-- {"result":"sold_out"}; 401 unauthenticated, 403 csrf, 404 not_found, 409 not_started,
-- ended or paused, 503 unavailable (Redis did not answer).

local ngx = ngx
local var = ngx.var
local find, sub, byte = string.find, string.sub, string.byte
local tonumber, tostring = tonumber, tostring
local tcp = ngx.socket.tcp
local hmac_sha1 = ngx.hmac_sha1
local encode_base64url = require("ngx.base64").encode_base64url

local _M = {}

local KEY, HOST, PORT, SELECT
local SOURCE, EVALSHA
-- Redis connections kept idle per worker: more than a worker ever has in flight.
-- (Timeouts: lua_socket_*_timeout in nginx.conf.)
local POOL_SIZE = 512

local function bulk(s)
  return "$" .. #s .. "\r\n" .. s .. "\r\n"
end

local function hex(raw)
  return (raw:gsub(".", function(c) return string.format("%02x", byte(c)) end))
end

-- Called once in the master (init_by_lua): settings from the environment, the script's
-- source, and the fixed head of every EVALSHA command.
function _M.init(script_path)
  KEY = assert(os.getenv("HB_COOKIE_KEY"), "HB_COOKIE_KEY is not set")
  HOST = os.getenv("HB_REDIS_HOST") or "127.0.0.1"
  PORT = tonumber(os.getenv("HB_REDIS_PORT") or "6379")
  local db = os.getenv("HB_REDIS_DB") or "0"
  -- A fresh connection is on database 0; another one is selected once per connection.
  SELECT = db ~= "0" and "*2\r\n$6\r\nSELECT\r\n" .. bulk(db) or nil
  local file = assert(io.open(script_path, "rb"))
  SOURCE = file:read("*a")
  file:close()
  -- EVALSHA <sha> 4 meta pool winners ledger <openid>
  EVALSHA = "*8\r\n$7\r\nEVALSHA\r\n" .. bulk(hex(ngx.sha1_bin(SOURCE))) .. "$1\r\n4\r\n"
end

-- The openid of a token whose MAC holds and which has not expired, else nil.
local function player(token)
  if not token or #token > 256 then
    return nil
  end
  local a = find(token, ".", 1, true)
  if not a then
    return nil
  end
  local b = find(token, ".", a + 1, true)
  if not b then
    return nil
  end
  local expires = tonumber(sub(token, a + 1, b - 1))
  if not expires or expires <= ngx.time() then
    return nil
  end
  local body = sub(token, 1, b - 1)
  -- Lua strings are interned: == compares them in constant time.
  if encode_base64url(hmac_sha1(KEY, body)) ~= sub(token, b + 1) then
    return nil
  end
  return sub(token, 1, a - 1)
end

-- An array reply of integers (grab_envelope's), or nil and Redis's error line.
local function read_integers(sock)
  local line, err = sock:receive()
  if not line then
    return nil, err
  end
  if byte(line) ~= 42 then -- '*'
    return nil, line
  end
  local out = {}
  for i = 1, tonumber(sub(line, 2)) do
    local item, ierr = sock:receive()
    if not item then
      return nil, ierr
    end
    out[i] = tonumber(sub(item, 2))
  end
  return out
end

local function call(sock, command)
  local ok, err = sock:send(command)
  if not ok then
    return nil, err
  end
  return read_integers(sock)
end

-- grab_envelope's reply for one player; the connection goes back to the pool after.
local function settle(campaign_id, openid)
  local sock = tcp()
  local ok, err = sock:connect(HOST, PORT)
  if not ok then
    return nil, err
  end
  if SELECT and sock:getreusedtimes() == 0 then
    ok, err = sock:send(SELECT)
    local line = ok and sock:receive()
    if line ~= "+OK" then
      sock:close()
      return nil, err or line
    end
  end
  -- The key schema of app/store/scripts.py: every key under the campaign's hash tag.
  local tag = "hb:{" .. campaign_id .. "}:"
  local args = bulk(tag .. "meta") .. bulk(tag .. "pool") .. bulk(tag .. "winners")
    .. bulk(tag .. "ledger") .. bulk(openid)
  local reply
  reply, err = call(sock, { EVALSHA, args })
  if not reply and err and sub(err, 1, 9) == "-NOSCRIPT" then
    -- Redis lost its script cache (a restart): EVAL caches the script again.
    reply, err = call(sock, { "*8\r\n$4\r\nEVAL\r\n", bulk(SOURCE), "$1\r\n4\r\n", args })
  end
  if not reply then
    sock:close()
    return nil, err
  end
  sock:setkeepalive(0, POOL_SIZE)
  return reply
end

local header = ngx.header

local function answer(status, body)
  ngx.status = status
  -- A length spares the chunked encoding nginx uses for a body of unknown length.
  header["Content-Length"] = #body
  ngx.print(body)
end

local CLOSED = {
  [1] = { 404, '{"error":"not_found"}' },
  [2] = { 409, '{"error":"not_started"}' },
  [3] = { 409, '{"error":"ended"}' },
  [4] = { 409, '{"error":"paused"}' },
}

-- content_by_lua: one grab.
function _M.handle()
  if ngx.req.get_method() ~= "POST" then
    return answer(405, '{"error":"method_not_allowed"}')
  end
  if var.http_x_requested_with ~= "hongbao" then
    return answer(403, '{"error":"csrf"}')
  end
  local openid = player(var.cookie_hb_session)
  if not openid then
    return answer(401, '{"error":"unauthenticated"}')
  end
  local reply, err = settle(var[1], openid)
  if not reply then
    ngx.log(ngx.ERR, "grab: redis: ", tostring(err))
    return answer(503, '{"error":"unavailable"}')
  end
  local closed = CLOSED[reply[1]]
  if closed then
    return answer(closed[1], closed[2])
  end
  local code, amount = reply[4], reply[5]
  if code == 2 then
    return answer(200, '{"result":"sold_out"}')
  end
  local result = code == 0 and '{"result":"won","amount_fen":' or '{"result":"already_won","amount_fen":'
  return answer(200, result .. amount .. "}")
end

return _M
