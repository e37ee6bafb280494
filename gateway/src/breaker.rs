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
//! A failure is the upstream's: unreachable, timed out, or a 5xx.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

/// One route's breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    pub name: String,
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
        const KNOWN: [&str; 5] = [
            "name",
            "failureRateThreshold",
            "slidingWindowSize",
            "minimumNumberOfCalls",
            "waitDurationInOpenState",
        ];
        if let Some(unknown) = args.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(if unknown == "fallbackUri" {
                "fallbackUri is not supported: an open breaker answers 503 problem+json".into()
            } else {
                format!("unknown argument {unknown}; use {}", KNOWN.join(", "))
            });
        }
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

    pub fn is_open(&self, now: Instant) -> bool {
        matches!(&*self.state.lock().unwrap_or_else(|p| p.into_inner()), State::Open(until) if now < *until)
    }
}

/// A permitted request's obligation to report back. Dropped without
/// [`Permit::succeeded`] or [`Permit::failed`] (an early return of any kind), it counts
/// as a failure, so a half-open breaker's trial can never be lost.
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
            self.breaker.record(false, Instant::now());
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
