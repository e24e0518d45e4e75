-- wrk script for bench/load.py: sends `Authorization: Bearer <key>` (or, with
-- KEY_HEADER=x-api-key, `X-Api-Key: <key>`) with the keys listed in the file named by
-- $KEYS_FILE (one per line), rotating through them, and prints a one-line JSON summary
-- (requests, non-2xx responses, socket errors, latency percentiles in µs).
local keys = {}
local requests = {}
local n = 0

function init(args)
  local path = os.getenv("KEYS_FILE")
  for line in io.lines(path) do
    if #line > 0 then
      keys[#keys + 1] = line
    end
  end
  -- Pre-format every request once; start each thread at a different offset.
  local x_api_key = os.getenv("KEY_HEADER") == "x-api-key"
  for i, key in ipairs(keys) do
    local headers
    if x_api_key then
      headers = { ["X-Api-Key"] = key }
    else
      headers = { ["Authorization"] = "Bearer " .. key }
    end
    requests[i] = wrk.format("GET", "/", headers)
  end
  n = math.random(#requests) - 1
end

function request()
  n = n % #requests + 1
  return requests[n]
end

function done(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "non2xx": %d, "errors": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
