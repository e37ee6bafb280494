-- wrk: GET /bench with the bearer token in BENCH_TOKEN (empty for targets without auth).
local token = os.getenv("BENCH_TOKEN") or ""
local headers = {}
if token ~= "" then headers["Authorization"] = "Bearer " .. token end

function request()
  return wrk.format("GET", "/bench", headers)
end

dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
