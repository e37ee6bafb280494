-- wrk: print one machine-readable line at the end; xtask's benchmarks read it.
-- Latencies in microseconds; errors are connect/read/write/timeout and non-2xx/3xx.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d errors=%d p50_us=%d p99_us=%d p999_us=%d\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout + e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
