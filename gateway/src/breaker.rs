//! The `CircuitBreaker` filter: when a route's upstream keeps failing, stop sending it
//! requests for a while and answer 503 at once, instead of making every caller wait
//! for a timeout. Resilience4J's count-based breaker, with its argument names:
//!
//! - **closed**: outcomes go into a window of the last `slidingWindowSize` calls; once
//!   at least `minimumNumberOfCalls` are in it and `failureRateThreshold` percent of
//!   them failed, the breaker opens;
//! - **open** for `waitDurationInOpenState` (ms): every request is refused;
//! - **half-open**: one trial request goes through; its success closes the breaker,
//!   its failure opens it again.
//!
//! A failure is the upstream's: unreachable, timed out, or a 5xx (and any status in
//! `statusCodes`). With `fallbackUri: forward:/path`, a request the breaker refuses
//! or that failed goes through the routes again as if the client had asked `/path`,
//! as Spring Cloud Gateway forwards it; without one, the client gets the 503 or the
//! failure itself.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

/// One route's breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    pub name: String,
    /// The path of `fallbackUri: forward:<path>`.
    pub fallback: Option<String>,
    /// Statuses that count as failures besides the 5xx (`statusCodes`).
    pub failure_statuses: Vec<axum::http::StatusCode>,
    failure_rate: f64,
    window: usize,
    minimum_calls: usize,
    open_for: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    Closed(VecDeque<bool>),
    Open(Instant),
    HalfOpen { trial_running: bool },
}

impl CircuitBreaker {
    pub fn from_args(args: &BTreeMap<String, String>) -> Result<Self, String> {
        const KNOWN: [&str; 7] = [
            "name",
            "fallbackUri",
            "statusCodes",
            "failureRateThreshold",
            "slidingWindowSize",
            "minimumNumberOfCalls",
            "waitDurationInOpenState",
        ];
        // Spring's shortcut, `CircuitBreaker=orders`, is the name.
        let mut args = args.clone();
        if let Some(name) = args.remove("_genkey_0") {
            args.insert("name".into(), name);
        }
        if let Some(unknown) = args.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!(
                "unknown argument {unknown}; use {}",
                KNOWN.join(", ")
            ));
        }
        let fallback = match args.get("fallbackUri").map(|u| u.trim()) {
            None | Some("") => None,
            Some(uri) => match uri.strip_prefix("forward:") {
                Some(path) if path.starts_with('/') => Some(path.to_owned()),
                _ => {
                    return Err(format!(
                        "fallbackUri {uri}: use forward:/path, as Spring Cloud Gateway forwards only"
                    ));
                }
            },
        };
        let failure_statuses = args
            .get("statusCodes")
            .map(|codes| {
                codes
                    .split(',')
                    .filter(|c| !c.trim().is_empty())
                    .map(crate::routes::status_arg)
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let number = |name: &str, default: f64| -> Result<f64, String> {
            match args.get(name) {
                None => Ok(default),
                Some(raw) => raw
                    .trim_end_matches("ms")
                    .parse::<f64>()
                    .ok()
                    .filter(|n| *n > 0.0)
                    .ok_or_else(|| format!("{name} must be a positive number")),
            }
        };
        let failure_rate = number("failureRateThreshold", 50.0)?;
        if failure_rate > 100.0 {
            return Err("failureRateThreshold is a percentage, at most 100".into());
        }
        let window = number("slidingWindowSize", 20.0)? as usize;
        let minimum_calls = (number("minimumNumberOfCalls", 10.0)? as usize).min(window);
        Ok(Self {
            fallback,
            failure_statuses,
            name: args
                .get("name")
                .cloned()
                .unwrap_or_else(|| "default".into()),
            failure_rate: failure_rate / 100.0,
            window,
            minimum_calls,
            open_for: Duration::from_millis(number("waitDurationInOpenState", 10_000.0)? as u64),
            state: Mutex::new(State::Closed(VecDeque::new())),
        })
    }

    /// Whether a request may go to the upstream now; `Err` carries how long the
    /// breaker stays open.
    pub fn permit(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            State::Closed(_) => Ok(()),
            State::Open(until) if now < *until => Err(*until - now),
            State::Open(_) => {
                *state = State::HalfOpen {
                    trial_running: true,
                };
                Ok(())
            }
            State::HalfOpen {
                trial_running: true,
            } => Err(Duration::from_secs(1)),
            State::HalfOpen { trial_running } => {
                *trial_running = true;
                Ok(())
            }
        }
    }

    /// Records the outcome of a permitted request.
    pub fn record(&self, success: bool, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let next = match &mut *state {
            State::Closed(outcomes) => {
                outcomes.push_back(success);
                while outcomes.len() > self.window {
                    outcomes.pop_front();
                }
                let failures = outcomes.iter().filter(|ok| !**ok).count();
                let tripped = outcomes.len() >= self.minimum_calls
                    && failures as f64 >= self.failure_rate * outcomes.len() as f64;
                if tripped {
                    tracing::warn!(breaker = %self.name, failures, calls = outcomes.len(), "circuit opened");
                    metrics::counter!("gateway_circuit_opened_total", "breaker" => self.name.clone())
                        .increment(1);
                    Some(State::Open(now + self.open_for))
                } else {
                    None
                }
            }
            State::HalfOpen { .. } if success => {
                tracing::info!(breaker = %self.name, "circuit closed");
                Some(State::Closed(VecDeque::new()))
            }
            State::HalfOpen { .. } => Some(State::Open(now + self.open_for)),
            // An outcome from before the breaker opened changes nothing.
            State::Open(_) => None,
        };
        if let Some(next) = next {
            *state = next;
        }
    }

    /// Whether the upstream's answer counts as a failure.
    pub fn is_failure(&self, status: axum::http::StatusCode) -> bool {
        status.is_server_error() || self.failure_statuses.contains(&status)
    }

    /// Gives back a permit whose request ended without an outcome (the client hung
    /// up): nothing is recorded, and a half-open breaker may send its next trial.
    fn release(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let State::HalfOpen { trial_running } = &mut *state {
            *trial_running = false;
        }
    }

    pub fn is_open(&self, now: Instant) -> bool {
        matches!(&*self.state.lock().unwrap_or_else(|p| p.into_inner()), State::Open(until) if now < *until)
    }
}

/// A permitted request's obligation to report back. Dropped without
/// [`Permit::succeeded`] or [`Permit::failed`] (the client hung up, or the request
/// was the client's fault), it records nothing and frees a half-open breaker's trial
/// slot: a client going away says nothing about the upstream.
#[derive(Debug)]
pub struct Permit {
    breaker: std::sync::Arc<CircuitBreaker>,
    reported: bool,
}

impl Permit {
    pub fn new(breaker: std::sync::Arc<CircuitBreaker>) -> Self {
        Self {
            breaker,
            reported: false,
        }
    }

    /// The breaker this permit reports to.
    pub fn breaker(&self) -> std::sync::Arc<CircuitBreaker> {
        self.breaker.clone()
    }

    pub fn succeeded(mut self) {
        self.reported = true;
        self.breaker.record(true, Instant::now());
    }

    pub fn failed(mut self) {
        self.reported = true;
        self.breaker.record(false, Instant::now());
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        let args: BTreeMap<String, String> = [
            ("slidingWindowSize", "4"),
            ("minimumNumberOfCalls", "4"),
            ("failureRateThreshold", "50"),
            ("waitDurationInOpenState", "1000"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        CircuitBreaker::from_args(&args).unwrap()
    }

    #[test]
    fn opens_on_the_failure_rate_then_lets_one_trial_through() {
        let b = breaker();
        let t = Instant::now();
        for ok in [true, false, true] {
            b.record(ok, t);
        }
        assert!(b.permit(t).is_ok(), "too few calls to judge");
        b.record(false, t);
        assert!(b.is_open(t), "2 of 4 failed: 50 %");
        assert!(b.permit(t + Duration::from_millis(500)).is_err());
        let later = t + Duration::from_millis(1000);
        assert!(b.permit(later).is_ok(), "the trial");
        assert!(b.permit(later).is_err(), "only one trial at a time");
        b.record(true, later);
        assert!(b.permit(later).is_ok(), "closed again");
    }

    #[test]
    fn an_abandoned_permit_records_nothing_and_frees_the_trial() {
        let b = std::sync::Arc::new(breaker());
        let t = Instant::now();
        for _ in 0..4 {
            b.record(false, t);
        }
        let later = t + Duration::from_secs(1);
        assert!(b.permit(later).is_ok(), "the trial");
        drop(Permit::new(b.clone()));
        assert!(!b.is_open(later), "still half-open, not opened again");
        assert!(b.permit(later).is_ok(), "the next trial may go");
    }

    #[test]
    fn fallback_and_status_codes_are_read_as_spring_writes_them() {
        let args = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let b = CircuitBreaker::from_args(&args(&[
            ("name", "orders"),
            ("fallbackUri", "forward:/fallback/orders"),
            ("statusCodes", "404,TOO_MANY_REQUESTS"),
        ]))
        .expect("breaker");
        assert_eq!(b.fallback.as_deref(), Some("/fallback/orders"));
        let failure = |code: u16| b.is_failure(axum::http::StatusCode::from_u16(code).unwrap());
        assert!(failure(404) && failure(429) && failure(503));
        assert!(!failure(400));
        let refused = CircuitBreaker::from_args(&args(&[("fallbackUri", "lb://other")]))
            .expect_err("not forward:");
        assert!(refused.contains("forward:/path"), "{refused}");
    }

    #[test]
    fn a_failed_trial_opens_it_again() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..4 {
            b.record(false, t);
        }
        let later = t + Duration::from_secs(1);
        assert!(b.permit(later).is_ok());
        b.record(false, later);
        assert!(b.is_open(later));
    }
}
