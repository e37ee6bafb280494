-- wrk: heartbeats for 100 services x 100 instances (svc-NN / svc-NN-MM), each
-- connection walking the instances from its own starting point.
local token = os.getenv("REGISTRY_TOKEN")
local counter = 0
local next_id = 0

function setup(thread)
  thread:set("start", next_id * 7919)
  next_id = next_id + 1
end

function init(args)
  counter = start or 0
end

function request()
  counter = counter + 1
  local n = counter % 10000
  local svc = math.floor(n / 100)
  local path = string.format("/api/v1/services/svc-%02d/instances/svc-%02d-%02d/heartbeat",
    svc, svc, n % 100)
  return wrk.format("PUT", path, { ["Authorization"] = "Bearer " .. token })
end

dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
