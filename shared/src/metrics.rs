//! Metrics under the names Spring Boot's Micrometer gives them, so the dashboards a
//! Spring shop already has (JVM aside) apply unchanged:
//!
//! - `http_server_requests_seconds{method,uri,status,outcome,exception,error}`: every
//!   HTTP request a server answered, `uri` being the route template (`/orders/{id}`),
//!   as a histogram with buckets ([`record_http`]).
//! - `process_*`: CPU, memory, threads and open descriptors, read from `/proc` at each
//!   scrape ([`record_process`]), under Micrometer's names and the Prometheus client
//!   libraries' standard ones.
//!
//! Database pools add `hikaricp_connections*` (see `crate::db`), the gateway
//! `spring_cloud_gateway_requests_seconds`.

use std::{sync::Mutex, time::Instant};

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};

/// The bucket bounds, in seconds, of every `*_seconds` histogram: from a fast cache
/// hit to a request that hit a timeout.
pub const BUCKETS: [f64; 16] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0,
];

/// Micrometer's `outcome` of a status: `SUCCESS`, `CLIENT_ERROR`, `SERVER_ERROR`,
/// `REDIRECTION`, `INFORMATIONAL`, or `UNKNOWN`.
pub fn outcome(status: u16) -> &'static str {
    match status {
        100..=199 => "INFORMATIONAL",
        200..=299 => "SUCCESS",
        300..=399 => "REDIRECTION",
        400..=499 => "CLIENT_ERROR",
        500..=599 => "SERVER_ERROR",
        _ => "UNKNOWN",
    }
}

/// A method as a label: the standard ones as they are, anything else `OTHER`, so a
/// client inventing methods cannot mint series.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "OTHER",
    }
}

/// A layer for a whole router: records `http_server_requests_seconds` for each
/// request. A request no route matched is `uri="NOT_FOUND"` (404) or `"UNKNOWN"`, as
/// Micrometer labels them, so arbitrary paths never become label values.
pub async fn record_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let template = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let uri = template.unwrap_or_else(|| {
        match status {
            404 => "NOT_FOUND",
            300..=399 => "REDIRECTION",
            _ => "UNKNOWN",
        }
        .to_owned()
    });
    let exception = if status >= 500 { "ServerError" } else { "none" };
    metrics::histogram!(
        "http_server_requests_seconds",
        "method" => method,
        "uri" => uri,
        "status" => status.to_string(),
        "outcome" => outcome(status),
        "exception" => exception,
        "error" => exception,
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// The CPU time and wall time of the previous scrape, for `process_cpu_usage`.
static LAST_CPU: Mutex<Option<(f64, Instant)>> = Mutex::new(None);

/// Sets the process gauges from `/proc/self` (Linux; elsewhere nothing is recorded).
pub fn record_process() {
    let Some(stat) = read_stat() else {
        return;
    };
    let ticks = ticks_per_second();
    let cpu_seconds = (stat.utime + stat.stime) as f64 / ticks;
    let boot = boot_time().unwrap_or(0.0);
    let start_time = boot + stat.start_ticks as f64 / ticks;
    let now_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1));
    let max = max_open_files();

    metrics::counter!("process_cpu_seconds_total").absolute(cpu_seconds as u64);
    metrics::gauge!("process_cpu_time_seconds").set(cpu_seconds);
    if let Some(rss) = resident_bytes() {
        metrics::gauge!("process_resident_memory_bytes").set(rss);
    }
    metrics::gauge!("process_virtual_memory_bytes").set(stat.vsize as f64);
    metrics::gauge!("process_threads").set(stat.threads as f64);
    metrics::gauge!("process_open_fds").set(open as f64);
    metrics::gauge!("process_files_open_files").set(open as f64);
    if let Some(max) = max {
        metrics::gauge!("process_max_fds").set(max);
        metrics::gauge!("process_files_max_files").set(max);
    }
    if boot > 0.0 {
        metrics::gauge!("process_start_time_seconds").set(start_time);
        metrics::gauge!("process_uptime_seconds").set((now_epoch - start_time).max(0.0));
    }
    // Micrometer's process_cpu_usage: the share of one machine's CPUs used since the
    // last scrape, 0 to 1.
    let now = Instant::now();
    let mut last = LAST_CPU.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((cpu_before, at)) = *last {
        let wall = now.duration_since(at).as_secs_f64();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        if wall > 0.0 {
            let usage = ((cpu_seconds - cpu_before) / wall / cores).clamp(0.0, 1.0);
            metrics::gauge!("process_cpu_usage").set(usage);
        }
    }
    *last = Some((cpu_seconds, now));
}

struct Stat {
    utime: u64,
    stime: u64,
    threads: u64,
    start_ticks: u64,
    vsize: u64,
}

/// `/proc/self/stat`, whose second field (the command) may hold spaces and parens:
/// the fields that follow are counted from the last `)`.
fn read_stat() -> Option<Stat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields from 3 (state); utime is field 14, i.e. index 11 here.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        threads: field(20)?,
        start_ticks: field(22)?,
        vsize: field(23)?,
    })
}

fn ticks_per_second() -> f64 {
    // USER_HZ is 100 on every Linux architecture that matters here.
    100.0
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn resident_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024.0)
}

fn boot_time() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn max_open_files() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_micrometer() {
        assert_eq!(outcome(201), "SUCCESS");
        assert_eq!(outcome(404), "CLIENT_ERROR");
        assert_eq!(outcome(503), "SERVER_ERROR");
        assert_eq!(outcome(302), "REDIRECTION");
    }

    #[test]
    fn this_process_reads_its_own_stat() {
        let stat = read_stat().expect("/proc/self/stat");
        assert!(stat.threads >= 1 && stat.vsize > 0 && stat.utime + stat.stime < u64::MAX);
        assert!(resident_bytes().is_some_and(|b| b > 0.0));
        assert!(max_open_files().is_some_and(|m| m > 0.0));
    }
}
