-- wrk script for the benchmark. BENCH_MODE picks the requests:
--   fixed   the headers given with -H, one static request (no Lua per request)
--   pool    a distinct valid token per request, read from BENCH_TOKENS
--           (lines BENCH_FIRST+1 .. BENCH_FIRST+BENCH_COUNT); once they run out
--           the last one repeats and "overrun" counts the repeats
--   forged  tokens with a random signature: BENCH_HEADER is the header segment
--           (empty: a random kid per token), BENCH_PAYLOAD the payload segment
-- BENCH_KEY is the subscription key to send (empty: none). BENCH_DELAY_MS, when
-- set, makes each connection wait that long between requests (a bounded rate).
-- done() prints one line, BENCH_JSON {...}, that bench/run.py reads.

local mode = os.getenv("BENCH_MODE") or "fixed"
local key = os.getenv("BENCH_KEY") or ""
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local threads = {}

overrun = 0

local function b64url(data)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = data:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local digits = {
      math.floor(n / 262144) % 64,
      math.floor(n / 4096) % 64,
      math.floor(n / 64) % 64,
      n % 64,
    }
    local keep = 4
    if b == nil then keep = 2 elseif c == nil then keep = 3 end
    for j = 1, keep do
      out[#out + 1] = alphabet:sub(digits[j] + 1, digits[j] + 1)
    end
  end
  return table.concat(out)
end

local function random_bytes(count)
  local bytes = {}
  for i = 1, count do bytes[i] = string.char(math.random(0, 255)) end
  return table.concat(bytes)
end

local function headers_for(token)
  local headers = { ["Authorization"] = "Bearer " .. token }
  if key ~= "" then headers["Ocp-Apim-Subscription-Key"] = key end
  return headers
end

function setup(thread)
  table.insert(threads, thread)
end

local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if pause ~= nil and pause > 0 then
  function delay()
    return pause
  end
end

if mode == "pool" then
  local tokens = {}
  local index = 0

  function init(args)
    local first = tonumber(os.getenv("BENCH_FIRST"))
    local count = tonumber(os.getenv("BENCH_COUNT"))
    local line_number = 0
    for line in io.lines(os.getenv("BENCH_TOKENS")) do
      line_number = line_number + 1
      if line_number > first + count then break end
      if line_number > first then tokens[#tokens + 1] = line end
    end
  end

  function request()
    index = index + 1
    if index > #tokens then
      index = #tokens
      overrun = overrun + 1
    end
    return wrk.format("GET", nil, headers_for(tokens[index]))
  end
elseif mode == "forged" then
  local signatures, headers = {}, {}
  local payload = os.getenv("BENCH_PAYLOAD")
  local fixed_header = os.getenv("BENCH_HEADER") or ""
  local sent = 0

  function init(args)
    math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))
    -- 2048 signatures x 1024 headers: two million distinct tokens.
    for i = 1, 2048 do signatures[i] = b64url(random_bytes(256)) end
    for i = 1, 1024 do
      if fixed_header ~= "" then
        headers[i] = fixed_header
      else
        local kid = {}
        for j = 1, 27 do
          local d = math.random(1, 64)
          kid[j] = alphabet:sub(d, d)
        end
        local json = '{"typ":"JWT","alg":"RS256","kid":"' .. table.concat(kid) .. '"}'
        headers[i] = b64url(json)
      end
    end
  end

  function request()
    local s = sent % 2048 + 1
    local h = math.floor(sent / 2048) % 1024 + 1
    sent = sent + 1
    local token = headers[h] .. "." .. payload .. "." .. signatures[s]
    return wrk.format("GET", nil, headers_for(token))
  end
end

function done(summary, latency, requests)
  local repeats = 0
  for _, thread in ipairs(threads) do
    repeats = repeats + (thread:get("overrun") or 0)
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"overrun":%d}\n',
    summary.requests, summary.duration, errors.connect, errors.read,
    errors.write, errors.status, errors.timeout,
    latency:percentile(50.0), latency:percentile(90.0),
    latency:percentile(99.0), latency.max, repeats))
end
