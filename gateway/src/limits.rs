//! Request limits the gateway enforces before a service sees anything: token-bucket
//! rate limiting per route (`RequestRateLimiter`), the size of request headers (431),
//! and CORS, which the gateway owns so no upstream's CORS headers are doubled.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use shared::Problem;

/// Whose requests share a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey {
    /// The token's `sub`.
    User,
    /// The client's IP address.
    Ip,
}

/// One route's token buckets.
#[derive(Debug)]
pub struct RateLimiter {
    /// Tokens added per second.
    pub replenish_rate: f64,
    /// Bucket size: the burst allowed after a quiet period.
    pub burst_capacity: f64,
    /// Tokens one request costs.
    pub requested_tokens: f64,
    pub key: LimitKey,
    buckets: Mutex<Buckets>,
}

/// The buckets by key, and when idle ones were last forgotten.
#[derive(Debug, Default)]
struct Buckets {
    by_key: HashMap<String, (f64, Instant)>,
    last_sweep: Option<Instant>,
    sweeps: u64,
}

/// Above this many keys, buckets idle long enough to be full again are forgotten, at
/// most once per [`SWEEP_EVERY`], so a busy limiter never rescans on every request.
const SWEEP_ABOVE: usize = 100_000;
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Past this many live keys, new keys share one overflow bucket: memory stays bounded
/// and a flood of new keys is limited together rather than not at all.
const MAX_KEYS: usize = 200_000;
const OVERFLOW_KEY: &str = "\u{0}overflow";

/// What the limiter decided, with the figures for the response headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub remaining: u64,
    /// Seconds until a request would be allowed (0 when it is).
    pub retry_after: u64,
}

impl RateLimiter {
    /// From `RequestRateLimiter` args, in Spring's spelling
    /// (`redis-rate-limiter.replenishRate`) or short (`replenishRate`).
    pub fn from_args(args: &std::collections::BTreeMap<String, String>) -> Result<Self, String> {
        let get = |name: &str| {
            args.get(&format!("redis-rate-limiter.{name}"))
                .or_else(|| args.get(name))
        };
        let number = |name: &str, default: Option<f64>| -> Result<f64, String> {
            match get(name) {
                Some(raw) => raw
                    .parse::<f64>()
                    .ok()
                    .filter(|n| *n > 0.0)
                    .ok_or_else(|| format!("{name} must be a positive number")),
                None => default.ok_or_else(|| format!("RequestRateLimiter needs {name}")),
            }
        };
        let replenish_rate = number("replenishRate", None)?;
        let burst_capacity = number("burstCapacity", Some(replenish_rate))?;
        let requested_tokens = number("requestedTokens", Some(1.0))?;
        let resolver = args
            .get("keyResolver")
            .or_else(|| args.get("key-resolver"))
            .map(|r| r.trim());
        // A bean expression as Spring reads it, spaces inside the braces allowed.
        let bean = resolver
            .and_then(|r| r.strip_prefix("#{")?.strip_suffix('}'))
            .map(str::trim);
        let key = match resolver {
            // Spring's own resolver, its default: the authenticated principal's name.
            _ if bean == Some("@principalNameKeyResolver") => LimitKey::User,
            None | Some("user") => LimitKey::User,
            Some("ip") => LimitKey::Ip,
            Some(bean) if bean.starts_with("#{") => {
                return Err(format!(
                    "key-resolver {bean} names a bean of your own code, which this gateway \
                     cannot run; write keyResolver: user (the token's subject) or ip (the \
                     client's address)"
                ));
            }
            Some(other) => return Err(format!("keyResolver must be user or ip, not {other}")),
        };
        if burst_capacity < requested_tokens {
            return Err("burstCapacity must be at least requestedTokens".into());
        }
        Ok(Self {
            replenish_rate,
            burst_capacity,
            requested_tokens,
            key,
            buckets: Mutex::new(Buckets::default()),
        })
    }

    /// Takes a request's tokens from `key`'s bucket, if it holds them.
    pub fn check(&self, key: &str, now: Instant) -> Decision {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let due = buckets
            .last_sweep
            .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY);
        if buckets.by_key.len() > SWEEP_ABOVE && due {
            // Forget keys idle long enough to have refilled completely.
            let full_after = Duration::from_secs_f64(self.burst_capacity / self.replenish_rate);
            buckets
                .by_key
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < full_after);
            buckets.last_sweep = Some(now);
            buckets.sweeps += 1;
        }
        let key = if buckets.by_key.len() >= MAX_KEYS && !buckets.by_key.contains_key(key) {
            OVERFLOW_KEY
        } else {
            key
        };
        let (tokens, updated) = buckets
            .by_key
            .entry(key.to_owned())
            .or_insert((self.burst_capacity, now));
        let refill = now.duration_since(*updated).as_secs_f64() * self.replenish_rate;
        *tokens = (*tokens + refill).min(self.burst_capacity);
        *updated = now;
        if *tokens >= self.requested_tokens {
            *tokens -= self.requested_tokens;
            Decision {
                allowed: true,
                remaining: tokens.floor() as u64,
                retry_after: 0,
            }
        } else {
            let missing = self.requested_tokens - *tokens;
            Decision {
                allowed: false,
                remaining: 0,
                retry_after: (missing / self.replenish_rate).ceil().max(1.0) as u64,
            }
        }
    }

    /// The `RateLimit-*` headers (and Spring's `X-RateLimit-*`) for a decision.
    pub fn headers(&self, decision: &Decision, headers: &mut HeaderMap) {
        let pairs = [
            ("ratelimit-limit", self.burst_capacity.floor() as u64),
            ("ratelimit-remaining", decision.remaining),
            ("ratelimit-reset", decision.retry_after),
            ("x-ratelimit-remaining", decision.remaining),
            (
                "x-ratelimit-burst-capacity",
                self.burst_capacity.floor() as u64,
            ),
            (
                "x-ratelimit-replenish-rate",
                self.replenish_rate.floor() as u64,
            ),
            (
                "x-ratelimit-requested-tokens",
                self.requested_tokens.floor() as u64,
            ),
        ];
        for (name, value) in pairs {
            headers.insert(name, HeaderValue::from(value));
        }
    }

    /// The 429 for a refused request.
    pub fn refusal(&self, decision: &Decision) -> Response {
        let mut response = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "Too many requests: this route allows {} per second (bursts of {}). Retry after {}s.",
                self.replenish_rate, self.burst_capacity, decision.retry_after
            ),
        )
        .retry_after(decision.retry_after);
        self.headers(decision, response.headers_mut());
        response
    }
}

/// 431 when the request's headers together exceed `max_bytes`.
pub fn check_header_size(headers: &HeaderMap, max_bytes: usize) -> Result<(), Response> {
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if size > max_bytes {
        return Err(Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("The request headers take {size} bytes; at most {max_bytes} are accepted."),
        )
        .into_response());
    }
    Ok(())
}

/// The `cors` section: which browser origins may call the API. None by default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsSettings {
    /// Exact origins (`https://shop.example.org`), or `*` for any.
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    pub allowed_headers: Vec<String>,
    /// Response headers browser code may read beyond the safelisted ones.
    pub exposed_headers: Vec<String>,
    pub max_age_seconds: u64,
}

impl Default for CorsSettings {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            allowed_methods: ["GET", "POST", "PUT", "PATCH", "DELETE"]
                .map(String::from)
                .to_vec(),
            allowed_headers: [
                "authorization",
                "content-type",
                "idempotency-key",
                "x-request-id",
            ]
            .map(String::from)
            .to_vec(),
            exposed_headers: [
                "location",
                "retry-after",
                "x-request-id",
                "ratelimit-limit",
                "ratelimit-remaining",
                "ratelimit-reset",
            ]
            .map(String::from)
            .to_vec(),
            max_age_seconds: 600,
        }
    }
}

impl CorsSettings {
    fn allows(&self, origin: &str) -> bool {
        self.allowed_origins.iter().any(|o| o == "*" || o == origin)
    }

    /// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method`), which
    /// carries no credentials and so is answered before authentication.
    pub fn preflight(&self, method: &Method, headers: &HeaderMap) -> Option<Response> {
        if method != Method::OPTIONS || !headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())?;
        if !self.allows(origin) {
            return Some(
                Problem::forbidden(format!("Origin {origin} may not call this API."))
                    .into_response(),
            );
        }
        let mut response = StatusCode::NO_CONTENT.into_response();
        let h = response.headers_mut();
        self.allow_origin(origin, h);
        if let Ok(v) = HeaderValue::from_str(&self.allowed_methods.join(", ")) {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.allowed_headers.join(", ")) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(self.max_age_seconds),
        );
        Some(response)
    }

    /// Adds the allow-origin headers to a response for the request's `Origin`.
    pub fn decorate(&self, origin: Option<&HeaderValue>, response: &mut HeaderMap) {
        if let Some(origin) = origin.and_then(|o| o.to_str().ok())
            && self.allows(origin)
        {
            self.allow_origin(origin, response);
        }
    }

    fn allow_origin(&self, origin: &str, headers: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(origin) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
            add_vary_origin(headers);
            if !self.exposed_headers.is_empty()
                && let Ok(v) = HeaderValue::from_str(&self.exposed_headers.join(", "))
            {
                headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
            }
        }
    }
}

/// Adds `Origin` to the response's `Vary`, keeping what the upstream varies on
/// (`Accept-Encoding`, say): caches must key on both.
fn add_vary_origin(headers: &mut HeaderMap) {
    let already = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            let v = v.trim();
            v == "*" || v.eq_ignore_ascii_case("origin")
        });
    if !already {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn limiter(rate: &str, burst: &str) -> RateLimiter {
        let args: BTreeMap<String, String> = [
            (
                "redis-rate-limiter.replenishRate".to_owned(),
                rate.to_owned(),
            ),
            (
                "redis-rate-limiter.burstCapacity".to_owned(),
                burst.to_owned(),
            ),
        ]
        .into();
        RateLimiter::from_args(&args).unwrap()
    }

    #[test]
    fn many_live_keys_are_swept_at_most_once_a_second_and_capped() {
        let l = limiter("1", "1");
        let t0 = Instant::now();
        for i in 0..=SWEEP_ABOVE {
            l.check(&format!("k{i}"), t0);
        }
        // Every key is live (its bucket not yet full again): a sweep frees nothing,
        // and the requests that follow within the second must not sweep again.
        for i in 0..100 {
            l.check(&format!("again{i}"), t0 + Duration::from_millis(10));
        }
        assert_eq!(lock_buckets(&l).sweeps, 1);
        l.check("later", t0 + Duration::from_millis(1100));
        assert_eq!(lock_buckets(&l).sweeps, 2);

        // At the cap, new keys share one overflow bucket: bounded, and still limited.
        let t1 = t0 + Duration::from_millis(1200);
        for i in 0..MAX_KEYS {
            l.check(&format!("more{i}"), t1);
        }
        assert!(lock_buckets(&l).by_key.len() <= MAX_KEYS + 1);
        assert!(
            !l.check("newcomer", t1).allowed,
            "the overflow bucket is spent by the keys before it"
        );
        assert!(!lock_buckets(&l).by_key.contains_key("newcomer"));
    }

    fn lock_buckets(l: &RateLimiter) -> std::sync::MutexGuard<'_, Buckets> {
        l.buckets.lock().unwrap()
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let l = limiter("2", "3");
        let t0 = Instant::now();
        for remaining in [2, 1, 0] {
            let d = l.check("alice", t0);
            assert!(d.allowed);
            assert_eq!(d.remaining, remaining);
        }
        let refused = l.check("alice", t0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, 1);
        assert!(l.check("bob", t0).allowed, "buckets are per key");
        assert!(
            l.check("alice", t0 + Duration::from_millis(500)).allowed,
            "one token per 0.5 s"
        );
        assert!(!l.check("alice", t0 + Duration::from_millis(500)).allowed);
    }

    #[test]
    fn bad_limiter_arguments_are_named() {
        let args: BTreeMap<String, String> = [("replenishRate".to_owned(), "-1".to_owned())].into();
        assert!(
            RateLimiter::from_args(&args)
                .unwrap_err()
                .contains("replenishRate")
        );
        let args: BTreeMap<String, String> = BTreeMap::new();
        assert!(
            RateLimiter::from_args(&args)
                .unwrap_err()
                .contains("replenishRate")
        );
    }

    #[test]
    fn springs_key_resolver_expressions_are_read_or_refused_by_name() {
        let with = |resolver: &str| {
            let args: BTreeMap<String, String> = [
                (
                    "redis-rate-limiter.replenishRate".to_owned(),
                    "1".to_owned(),
                ),
                ("key-resolver".to_owned(), resolver.to_owned()),
            ]
            .into();
            RateLimiter::from_args(&args)
        };
        for own in [
            "#{@principalNameKeyResolver}",
            "#{ @principalNameKeyResolver }",
        ] {
            assert_eq!(
                with(own).unwrap().key,
                LimitKey::User,
                "Spring's own resolver is the token's subject"
            );
        }
        let own = with("#{@userKeyResolver}").unwrap_err();
        assert!(
            own.contains("#{@userKeyResolver}") && own.contains("keyResolver: user"),
            "{own}"
        );
    }
}

/// Where `RequestRateLimiter` keeps its buckets when several gateway instances must
/// share one limit: a Redis server (`redis.url`, or `REDIS_URL`), as Spring Cloud
/// Gateway's `redis-rate-limiter` does. Without one, each gateway counts for itself.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: Option<String>,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: only where it points is shown.
        let shown = self.url.as_deref().map(|u| match u.rsplit_once('@') {
            Some((_, host)) => format!("<credentials>@{host}"),
            None => u.to_owned(),
        });
        f.debug_struct("RedisSettings")
            .field("url", &shown)
            .finish()
    }
}

/// One token bucket check, atomic in Redis, on Redis's clock so that every gateway
/// agrees on time: the bucket refills at `rate` tokens a second up to `capacity`;
/// a request takes `requested` tokens when the bucket holds them. Both keys expire
/// once a bucket would be full again twice over, so idle keys cost nothing.
/// Returns `{allowed, tokens left (whole), seconds until enough tokens}`.
const BUCKET_SCRIPT: &str = r"
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local requested = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local tokens = tonumber(redis.call('GET', KEYS[1])) or capacity
local refreshed = tonumber(redis.call('GET', KEYS[2])) or now
local filled = math.min(capacity, tokens + math.max(0, now - refreshed) * rate)
local allowed = 0
local wait = 0
if filled >= requested then
  filled = filled - requested
  allowed = 1
else
  wait = math.ceil((requested - filled) / rate)
end
local ttl = math.max(1, math.ceil(capacity / rate * 2))
redis.call('SET', KEYS[1], tostring(filled), 'EX', ttl)
redis.call('SET', KEYS[2], tostring(now), 'EX', ttl)
return { allowed, math.floor(filled), wait }
";

/// Token buckets in Redis, shared by every gateway that points at the same server.
pub struct SharedBuckets {
    client: redis::Client,
    script: redis::Script,
    /// Connected on first use, so a gateway starts while Redis is down.
    connection: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    /// No new connection attempt before this, after one failed.
    retry_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for SharedBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuckets").finish_non_exhaustive()
    }
}

impl SharedBuckets {
    /// Buckets on the server `settings` names, or `None` without one. A URL that
    /// cannot be a Redis address is an error naming the setting.
    pub fn new(settings: &RedisSettings) -> Result<Option<Self>, String> {
        let Some(url) = settings.url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let client = redis::Client::open(url)
            .map_err(|e| format!("redis.url is not a Redis URL (redis://host:port): {e}"))?;
        Ok(Some(Self {
            client,
            script: redis::Script::new(BUCKET_SCRIPT),
            connection: tokio::sync::Mutex::new(None),
            retry_at: Mutex::new(None),
        }))
    }

    async fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        let mut connection = self.connection.lock().await;
        if let Some(connection) = connection.as_ref() {
            return Some(connection.clone());
        }
        let now = Instant::now();
        if self
            .retry_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| now < at)
        {
            return None;
        }
        // A request waits for at most one short attempt; later reconnects (once one
        // connection was made) are the manager's, in the background.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))
        });
        match attempt {
            Ok(made) => {
                *connection = Some(made.clone());
                Some(made)
            }
            Err(error) => {
                tracing::warn!(%error, "Redis cannot be reached: rate limits are not enforced until it can");
                *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + Duration::from_secs(1));
                None
            }
        }
    }

    /// Takes a request's tokens from the bucket of `key` on `route`. `None` when Redis
    /// cannot answer: the request is let through, as Spring's limiter does, since a
    /// limiter that is down must not take the routes down with it.
    pub async fn check(&self, limiter: &RateLimiter, route: &str, key: &str) -> Option<Decision> {
        let mut connection = self.connection().await?;
        let bucket = format!("request_rate_limiter.{{{route}:{key}}}");
        let answer: Result<(i64, i64, i64), redis::RedisError> = self
            .script
            .key(format!("{bucket}.tokens"))
            .key(format!("{bucket}.timestamp"))
            .arg(limiter.replenish_rate)
            .arg(limiter.burst_capacity)
            .arg(limiter.requested_tokens)
            .invoke_async(&mut connection)
            .await;
        match answer {
            Ok((allowed, remaining, wait)) => Some(Decision {
                allowed: allowed == 1,
                remaining: u64::try_from(remaining).unwrap_or(0),
                retry_after: u64::try_from(wait).unwrap_or(0),
            }),
            Err(error) => {
                metrics::counter!("gateway_rate_limiter_errors_total").increment(1);
                tracing::warn!(%error, "Redis did not answer a rate limit check: the request is let through");
                None
            }
        }
    }
}
