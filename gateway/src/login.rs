//! What stands between `POST /auth/token` and an attacker: a bound on password checks
//! running at once, and throttles on failed logins per client address and per user
//! name.
//!
//! A password check is argon2: about 19 MiB and tens of milliseconds of one core, by
//! design. Unbounded, a flood of logins is a flood of those: memory grows with every
//! concurrent check until the kernel kills the gateway. So at most
//! `max_concurrent_checks` run at once and a login beyond them is answered 503 with
//! `Retry-After` at once, without hashing. Failed logins count per address and per
//! user name in fixed windows; past the limit, logins from that address or for that
//! name are answered 429 with `Retry-After` until the window ends, again without
//! hashing, so guessing costs the attacker time and the gateway nothing.
//!
//! The checks run on a pool of exactly that many threads of their own, not on the
//! runtimes' blocking pools (up to 512 threads each): memory the allocator keeps for
//! a thread's next hash stays bounded by the pool's size.
//!
//! The address is the TCP peer's. Behind a load balancer that hides client addresses
//! every client shares one, so raise `max_failures_per_address` there.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `auth.login` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginSettings {
    /// Password checks that may run at once; 0 is one per core.
    pub max_concurrent_checks: usize,
    /// Failed logins from one client address within a window before it is throttled.
    pub max_failures_per_address: u32,
    /// Failed logins for one user name within a window before it is throttled.
    pub max_failures_per_user: u32,
    pub window_seconds: u64,
    /// Addresses and names remembered at most; when full, finished windows are
    /// forgotten first, then the oldest.
    pub max_tracked: usize,
}

impl Default for LoginSettings {
    fn default() -> Self {
        Self {
            max_concurrent_checks: 0,
            max_failures_per_address: 20,
            max_failures_per_user: 5,
            window_seconds: 60,
            max_tracked: 100_000,
        }
    }
}

/// Why a login was not even checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failures from this address or for this name: 429.
    Throttled { retry_after: Duration },
    /// Every password check slot is taken: 503.
    Busy,
}

/// The login guard: admission, the password checks, then the outcome reported back.
#[derive(Debug)]
pub struct LoginGuard {
    checks: Arc<Semaphore>,
    pool: CheckPool,
    settings: LoginSettings,
    by_address: Mutex<Windows<IpAddr>>,
    by_user: Mutex<Windows<String>>,
}

/// Leave to check one password; the check slot is held until it is dropped.
#[derive(Debug)]
pub struct Admission {
    _slot: OwnedSemaphorePermit,
}

impl LoginGuard {
    pub fn new(settings: &LoginSettings) -> Self {
        let slots = if settings.max_concurrent_checks == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            settings.max_concurrent_checks
        };
        Self {
            checks: Arc::new(Semaphore::new(slots)),
            pool: CheckPool::new(slots),
            settings: settings.clone(),
            by_address: Mutex::new(Windows::default()),
            by_user: Mutex::new(Windows::default()),
        }
    }

    /// The length of a throttling window.
    fn window(&self) -> Duration {
        Duration::from_secs(self.settings.window_seconds.max(1))
    }

    /// Whether a login for `user` from `address` may be checked now.
    pub fn admit(&self, address: IpAddr, user: &str) -> Result<Admission, Refusal> {
        let now = Instant::now();
        let window = self.window();
        let throttled = [
            lock(&self.by_address).blocked(
                &address,
                self.settings.max_failures_per_address,
                window,
                now,
            ),
            lock(&self.by_user).blocked(user, self.settings.max_failures_per_user, window, now),
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(retry_after) = throttled {
            return Err(Refusal::Throttled { retry_after });
        }
        let slot = self
            .checks
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy)?;
        Ok(Admission { _slot: slot })
    }

    /// Runs `check` (a password hash) on the guard's own threads while `admission`
    /// holds its slot; `None` if the pool has stopped.
    pub async fn check<T: Send + 'static>(
        &self,
        admission: Admission,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.pool.run(Box::new(move || {
            let outcome = check();
            // The slot is free before the answer is: whoever reads the answer and
            // logs in again must find it free, not race the pool thread for it.
            drop(admission);
            let _ = done.send(outcome);
        }));
        result.await.ok()
    }

    /// Counts a failed login against `address` and `user`.
    pub fn failed(&self, address: IpAddr, user: &str) {
        let now = Instant::now();
        let window = self.window();
        let max = self.settings.max_tracked.max(1);
        lock(&self.by_address).count(address, window, now, max);
        lock(&self.by_user).count(user.to_owned(), window, now, max);
    }

    /// A successful login clears the name's failures (not the address's: one right
    /// password must not reset an address's guessing of other names).
    pub fn succeeded(&self, user: &str) {
        lock(&self.by_user).entries.remove(user);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads taking jobs from one queue. Admission already bounds the
/// jobs to the threads' number, so the queue never grows past it.
#[derive(Debug)]
struct CheckPool {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl CheckPool {
    fn new(threads: usize) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..threads.max(1) {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-check-{n}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = lock(&queue).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password check thread");
            }
        }
        Self { jobs }
    }

    fn run(&self, job: Job) {
        // Fails only if every thread is gone; the caller then sees its result dropped.
        let _ = self.jobs.send(job);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Failures per key in fixed windows: (window start, failures).
#[derive(Debug)]
struct Windows<K> {
    entries: HashMap<K, (Instant, u32)>,
}

impl<K> Default for Windows<K> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Windows<K> {
    /// How long `key` stays throttled, if it has `max` failures in its current window.
    fn blocked<Q>(&self, key: &Q, max: u32, window: Duration, now: Instant) -> Option<Duration>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let (start, failures) = self.entries.get(key)?;
        let ends = *start + window;
        (*failures >= max && ends > now).then(|| ends - now)
    }

    fn count(&mut self, key: K, window: Duration, now: Instant, max_tracked: usize) {
        if !self.entries.contains_key(&key) && self.entries.len() >= max_tracked {
            self.entries.retain(|_, (start, _)| *start + window > now);
            if self.entries.len() >= max_tracked
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        let entry = self.entries.entry(key).or_insert((now, 0));
        if entry.0 + window <= now {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_address: u32, per_user: u32, checks: usize) -> LoginSettings {
        LoginSettings {
            max_concurrent_checks: checks,
            max_failures_per_address: per_address,
            max_failures_per_user: per_user,
            window_seconds: 60,
            max_tracked: 3,
        }
    }

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_name_is_throttled_after_its_failures_and_cleared_by_a_success() {
        let guard = LoginGuard::new(&settings(100, 2, 4));
        for _ in 0..2 {
            drop(guard.admit(HOME, "alice").expect("admitted"));
            guard.failed(HOME, "alice");
        }
        let Err(Refusal::Throttled { retry_after }) = guard.admit(HOME, "alice") else {
            panic!("alice should be throttled");
        };
        assert!(retry_after <= Duration::from_secs(60) && retry_after > Duration::ZERO);
        assert!(guard.admit(HOME, "bob").is_ok(), "other names are not");
        guard.succeeded("alice");
        assert!(guard.admit(HOME, "alice").is_ok());
    }

    #[test]
    fn an_address_is_throttled_whatever_names_it_tries() {
        let guard = LoginGuard::new(&settings(3, 100, 4));
        for name in ["a", "b", "c"] {
            guard.failed(HOME, name);
        }
        assert!(matches!(
            guard.admit(HOME, "d"),
            Err(Refusal::Throttled { .. })
        ));
        let elsewhere: IpAddr = "10.0.0.7".parse().expect("ip");
        assert!(guard.admit(elsewhere, "d").is_ok());
    }

    #[test]
    fn checks_beyond_the_bound_are_refused_until_one_ends() {
        let guard = LoginGuard::new(&settings(100, 100, 2));
        let first = guard.admit(HOME, "a").expect("slot 1");
        let _second = guard.admit(HOME, "b").expect("slot 2");
        assert_eq!(guard.admit(HOME, "c").unwrap_err(), Refusal::Busy);
        drop(first);
        assert!(guard.admit(HOME, "c").is_ok());
    }

    #[tokio::test]
    async fn checks_run_on_the_pool_and_free_their_slot() {
        let guard = LoginGuard::new(&settings(100, 100, 1));
        let admission = guard.admit(HOME, "a").expect("slot");
        assert_eq!(guard.admit(HOME, "b").unwrap_err(), Refusal::Busy);
        let thread = guard
            .check(admission, || {
                std::thread::current().name().map(str::to_owned)
            })
            .await
            .expect("ran");
        assert_eq!(thread.as_deref(), Some("password-check-0"));
        assert!(guard.admit(HOME, "b").is_ok(), "the slot came back");
    }

    #[test]
    fn memory_is_bounded_by_max_tracked() {
        let guard = LoginGuard::new(&settings(1, 1, 1));
        for i in 0..1000u32 {
            guard.failed(IpAddr::V4(i.into()), &format!("user-{i}"));
        }
        assert!(lock(&guard.by_address).entries.len() <= 3);
        assert!(lock(&guard.by_user).entries.len() <= 3);
    }
}
