-- players.lua: every request carries the session cookie of a different player.
-- wrk -t<threads> -s players.lua URL -- <sessions.tsv> <method> <origin> <threads>
-- sessions.tsv holds "openid<TAB>cookie value" lines (./hb mint-sessions writes them).
-- done() prints one "BENCH {json}" line that bench/run.py parses.

local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  tokens = {}
  for line in io.lines(args[1]) do
    local token = line:match("\t(%S+)$")
    if token then tokens[#tokens + 1] = token end
  end
  method = args[2] or "POST"
  origin = args[3]
  -- Thread i takes players i, i + threads, i + 2 * threads, ...: no two threads share one.
  stride = tonumber(args[4])
  index = id
end

function request()
  local token = tokens[(index % #tokens) + 1]
  index = index + stride
  local headers = {
    ["Cookie"] = "hb_session=" .. token,
    ["Origin"] = origin,
    ["X-Requested-With"] = "hongbao",
  }
  return wrk.format(method, nil, headers, nil)
end

function done(summary, latency, requests)
  local s = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d, ' ..
    '"timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    s.connect, s.read, s.write, s.status, s.timeout))
end
