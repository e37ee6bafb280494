//! Choosing an instance, and remembering how each one behaves.
//!
//! Per instance address the gateway keeps the requests in flight (for
//! least-outstanding balancing) and consecutive failures (connect errors and 5xx). After
//! `EJECT_AFTER` consecutive failures an instance is ejected for a backoff that doubles
//! with each ejection (1 s, 2 s, 4 s... at most 30 s) and comes back by itself when it
//! runs out; one success resets everything. When every instance is ejected they are
//! all used again: some traffic to a maybe-sick instance beats a certain 503.
//!
//! Retries draw on a budget per service over a sliding window of ten seconds (as
//! Finagle's): retries may be a fifth of the requests sent to the service within the
//! window, plus ten, so retries never multiply the load of a sick upstream by more
//! than about 20 %, one sick service cannot spend another's budget, and a quiet hour
//! does not bank retries for the next burst.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;

use shared::registry::ServiceInstance;

/// Consecutive failures that eject an instance.
pub const EJECT_AFTER: u32 = 3;
const BASE_EJECTION: Duration = Duration::from_secs(1);
const MAX_EJECTION: Duration = Duration::from_secs(30);

/// How a route spreads requests over instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balancing {
    #[default]
    RoundRobin,
    /// Power of two choices: of two random instances, the one with fewer in flight.
    LeastOutstanding,
}

/// What the gateway knows of one instance.
#[derive(Debug, Default)]
pub struct InstanceHealth {
    pub outstanding: AtomicUsize,
    failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// How it is reached over http, when its address is a `host:port`.
    pub reach: Option<Reach>,
}

/// How an instance is reached over http, made once rather than for every request: the
/// authority of its requests' URIs and the `Host` they carry (as the pooled client
/// would spell it: without the port when it is http's default).
#[derive(Debug, Clone)]
pub struct Reach {
    pub authority: axum::http::uri::Authority,
    pub host: axum::http::HeaderValue,
}

impl Reach {
    /// The reach of `address`: a `host:port`, or a fixed upstream's base URL.
    pub fn of(address: &str) -> Option<Self> {
        let authority = match address.split_once("://") {
            Some(("http", rest)) => rest.split('/').next().unwrap_or_default(),
            Some(_) => return None,
            None => address,
        };
        let authority: axum::http::uri::Authority = authority.parse().ok()?;
        // From the host and port only: a fixed upstream's credentials stay out of it.
        let host = match authority.port_u16() {
            None | Some(80) => axum::http::HeaderValue::from_str(authority.host()),
            Some(port) => {
                axum::http::HeaderValue::from_str(&format!("{}:{port}", authority.host()))
            }
        };
        Some(Self {
            host: host.ok()?,
            authority,
        })
    }
}

/// One request in flight to an instance, counted while it lives: dropped on every
/// path, a client that hangs up mid-request included, so the count never leaks.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InstanceHealth {
    /// The authority a request to it names, and the `Host` it carries: as made once
    /// when it is reached over http, else `authority` parsed now (none when it makes
    /// no authority) and the `Host` left to the client.
    pub fn reached(
        &self,
        authority: &str,
    ) -> (
        Option<axum::http::uri::Authority>,
        Option<axum::http::HeaderValue>,
    ) {
        match &self.reach {
            Some(reach) => (Some(reach.authority.clone()), Some(reach.host.clone())),
            None => (authority.parse().ok(), None),
        }
    }

    /// Counts a request to this instance until the guard is dropped.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.outstanding)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Acquire) > now_ms
    }

    pub fn ejected_until(&self) -> u64 {
        self.ejected_until_ms.load(Ordering::Acquire)
    }

    pub fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
        self.ejections.store(0, Ordering::Release);
    }

    /// Records a failure; returns true when it ejected the instance.
    pub fn failed(&self, now_ms: u64) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < EJECT_AFTER {
            return false;
        }
        self.failures.store(0, Ordering::Release);
        let round = self.ejections.fetch_add(1, Ordering::AcqRel).min(5);
        let backoff = (BASE_EJECTION * 2u32.pow(round)).min(MAX_EJECTION);
        self.ejected_until_ms
            .store(now_ms + backoff.as_millis() as u64, Ordering::Release);
        true
    }
}

/// Instance health by address, and the retry budgets by service.
#[derive(Debug)]
pub struct Balancer {
    /// Read on every request without a lock; copied on the rare insert of a new address.
    health: ArcSwap<HashMap<String, Arc<InstanceHealth>>>,
    budgets: ArcSwap<HashMap<String, Arc<RetryBudget>>>,
}

impl Default for Balancer {
    fn default() -> Self {
        Self {
            health: ArcSwap::from_pointee(HashMap::new()),
            budgets: ArcSwap::from_pointee(HashMap::new()),
        }
    }
}

/// The window a retry budget counts over, in one-second slots.
const WINDOW_SECONDS: u64 = 10;
/// Retries allowed in a window whatever the traffic, so a quiet service can retry.
const RETRIES_IN_RESERVE: u64 = 10;
/// Retries allowed per request sent, within the window.
const RETRY_RATIO: f64 = 0.2;

/// One service's retry budget: requests and retries per second over the window.
#[derive(Debug, Default)]
pub struct RetryBudget {
    slots: [BudgetSlot; WINDOW_SECONDS as usize],
}

#[derive(Debug, Default)]
struct BudgetSlot {
    /// The second (since the epoch) this slot counts; older counts are stale.
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl RetryBudget {
    /// The slot for `second`, emptied first when it still holds an older second.
    /// Counting is approximate under races (a count may land in a slot being reset),
    /// which a budget can afford.
    fn slot(&self, second: u64) -> &BudgetSlot {
        let slot = &self.slots[(second % WINDOW_SECONDS) as usize];
        let held = slot.second.load(Ordering::Acquire);
        if held != second
            && slot
                .second
                .compare_exchange(held, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Release);
            slot.retries.store(0, Ordering::Release);
        }
        slot
    }

    /// Counts a request sent at `now_ms`.
    pub fn deposit(&self, now_ms: u64) {
        self.slot(now_ms / 1000)
            .requests
            .fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one retry at `now_ms`, if the window's budget has one.
    pub fn withdraw(&self, now_ms: u64) -> bool {
        let second = now_ms / 1000;
        let (mut requests, mut retries) = (0u64, 0u64);
        for slot in &self.slots {
            let at = slot.second.load(Ordering::Acquire);
            if at <= second && second - at < WINDOW_SECONDS {
                requests += u64::from(slot.requests.load(Ordering::Acquire));
                retries += u64::from(slot.retries.load(Ordering::Acquire));
            }
        }
        let allowed = RETRIES_IN_RESERVE + (requests as f64 * RETRY_RATIO) as u64;
        if retries >= allowed {
            return false;
        }
        self.slot(second).retries.fetch_add(1, Ordering::AcqRel);
        true
    }
}

impl Balancer {
    /// Forgets the health of discovered instances that are no longer `listed`, so that
    /// registrations coming and going (a service credential can make any number) do
    /// not grow the map for ever. A fixed upstream's (`scheme://authority`, bounded by
    /// the routes) is kept, and so is one with a request in flight.
    pub fn forget_departed(&self, listed: &std::collections::HashSet<&str>) {
        let kept = |address: &String, health: &Arc<InstanceHealth>| {
            address.contains("://")
                || listed.contains(address.as_str())
                || health.outstanding.load(Ordering::Acquire) > 0
        };
        // The map is copied only when something is to go.
        if self.health.load().iter().all(|(a, h)| kept(a, h)) {
            return;
        }
        self.health.rcu(|current| {
            let mut next = (**current).clone();
            next.retain(|address, health| kept(address, health));
            next
        });
    }

    /// How many addresses have a health record.
    pub fn known(&self) -> usize {
        self.health.load().len()
    }

    pub fn health(&self, address: &str) -> Arc<InstanceHealth> {
        if let Some(known) = self.health.load().get(address) {
            return known.clone();
        }
        let mut created = None;
        self.health.rcu(|current| {
            let mut next = (**current).clone();
            let entry = next
                .entry(address.to_owned())
                .or_insert_with(|| {
                    Arc::new(InstanceHealth {
                        reach: Reach::of(address),
                        ..InstanceHealth::default()
                    })
                })
                .clone();
            created = Some(entry);
            next
        });
        created.unwrap_or_default()
    }

    /// Picks an `UP` instance not in `tried`, avoiding ejected ones while any other
    /// is left. `turn` drives round robin. Allocates nothing once every instance's
    /// health is known: it runs on every request.
    pub fn pick<'a>(
        &self,
        instances: &'a [ServiceInstance],
        tried: &[String],
        balancing: Balancing,
        turn: usize,
        now_ms: u64,
    ) -> Option<(&'a ServiceInstance, Arc<InstanceHealth>)> {
        let eligible = |i: &&ServiceInstance| i.is_up() && !tried.contains(&i.address);
        let mut known = self.health.load();
        if instances
            .iter()
            .filter(eligible)
            .any(|i| !known.contains_key(&i.address))
        {
            for instance in instances.iter().filter(eligible) {
                self.health(&instance.address);
            }
            known = self.health.load();
        }
        let candidates = || {
            instances
                .iter()
                .filter(eligible)
                .filter_map(|i| known.get(&i.address).map(|h| (i, h)))
        };
        // The healthy ones, or every candidate when all are ejected.
        let healthy = candidates().filter(|(_, h)| !h.is_ejected(now_ms)).count();
        let pool = |nth: usize| {
            candidates()
                .filter(|(_, h)| healthy == 0 || !h.is_ejected(now_ms))
                .nth(nth)
        };
        let size = if healthy > 0 {
            healthy
        } else {
            candidates().count()
        };
        if size == 0 {
            return None;
        }
        // The pool's `nth`; or, when another request ejected one of the pool since it
        // was counted (so that the pool is now shorter), the candidates' own.
        let at = |nth: usize| {
            pool(nth).or_else(|| {
                let count = candidates().count();
                (count > 0).then(|| candidates().nth(nth % count)).flatten()
            })
        };
        let chosen = match balancing {
            Balancing::RoundRobin => at(turn % size)?,
            Balancing::LeastOutstanding => {
                let a = at(rand::random_range(0..size))?;
                let b = at(rand::random_range(0..size))?;
                if b.1.outstanding.load(Ordering::Relaxed) < a.1.outstanding.load(Ordering::Relaxed)
                {
                    b
                } else {
                    a
                }
            }
        };
        Some((chosen.0, chosen.1.clone()))
    }

    /// `service`'s retry budget (`service` being the route's upstream).
    pub fn budget(&self, service: &str) -> Arc<RetryBudget> {
        if let Some(known) = self.budgets.load().get(service) {
            return known.clone();
        }
        let mut created = None;
        self.budgets.rcu(|current| {
            let mut next = (**current).clone();
            let entry = next.entry(service.to_owned()).or_default().clone();
            created = Some(entry);
            next
        });
        created.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_reached_at_its_address_with_the_host_a_client_would_send() {
        let reach = |a: &str| Reach::of(a).map(|r| (r.authority.to_string(), r.host));
        assert_eq!(
            reach("10.0.0.7:8081"),
            Some(("10.0.0.7:8081".into(), "10.0.0.7:8081".parse().unwrap()))
        );
        assert_eq!(
            reach("10.0.0.7:80"),
            Some(("10.0.0.7:80".into(), "10.0.0.7".parse().unwrap())),
            "http's default port is left out, as the pooled client leaves it out"
        );
        assert_eq!(
            reach("[::1]:9000"),
            Some(("[::1]:9000".into(), "[::1]:9000".parse().unwrap()))
        );
        assert_eq!(
            reach("http://127.0.0.1:9000"),
            Some(("127.0.0.1:9000".into(), "127.0.0.1:9000".parse().unwrap())),
            "a fixed upstream's base"
        );
        assert_eq!(
            reach("http://user:secret@backend:8080").map(|(_, host)| host),
            Some("backend:8080".parse().unwrap()),
            "credentials are not the host"
        );
        assert!(reach("https://shop.example:8443").is_none(), "http only");
        assert!(reach("not an authority").is_none());
        let balancer = Balancer::default();
        assert!(balancer.health("10.0.0.7:8081").reach.is_some());
    }

    #[test]
    fn departed_instances_are_forgotten_fixed_and_busy_ones_kept() {
        let balancer = Balancer::default();
        balancer.health("10.0.0.1:8080");
        let busy = balancer.health("10.0.0.2:8080");
        busy.outstanding.store(1, Ordering::Release);
        balancer.health("10.0.0.3:8080");
        balancer.health("http://backend:9000");
        let listed = std::collections::HashSet::from(["10.0.0.3:8080"]);
        balancer.forget_departed(&listed);
        let known = balancer.health.load();
        assert!(!known.contains_key("10.0.0.1:8080"), "gone from discovery");
        assert!(known.contains_key("10.0.0.2:8080"), "a request in flight");
        assert!(known.contains_key("10.0.0.3:8080"), "still listed");
        assert!(
            known.contains_key("http://backend:9000"),
            "a fixed upstream"
        );
        assert_eq!(balancer.known(), 3);
    }

    fn instance(port: u16, status: &str) -> ServiceInstance {
        ServiceInstance {
            service: "s".into(),
            instance_id: format!("i{port}"),
            host: "127.0.0.1".into(),
            port,
            address: format!("127.0.0.1:{port}"),
            status: status.into(),
            metadata: Default::default(),
            secure_port: None,
        }
    }

    #[test]
    fn three_failures_eject_with_a_growing_backoff_and_success_resets() {
        let h = InstanceHealth::default();
        assert!(!h.failed(0) && !h.failed(0));
        assert!(h.failed(0));
        assert_eq!(h.ejected_until(), 1000);
        for _ in 0..3 {
            h.failed(2000);
        }
        assert_eq!(h.ejected_until(), 4000, "second ejection lasts 2 s");
        h.succeeded();
        for _ in 0..3 {
            h.failed(10_000);
        }
        assert_eq!(h.ejected_until(), 11_000, "reset after a success");
    }

    #[test]
    fn only_up_untried_unejected_instances_are_picked_unless_all_are_ejected() {
        let b = Balancer::default();
        let all = vec![
            instance(1, "UP"),
            instance(2, "DRAINING"),
            instance(3, "UP"),
        ];
        for turn in 0..10 {
            let (i, _) = b.pick(&all, &[], Balancing::RoundRobin, turn, 0).unwrap();
            assert_ne!(i.port, 2, "DRAINING gets no new request");
        }
        let tried = vec!["127.0.0.1:1".to_owned()];
        assert_eq!(
            b.pick(&all, &tried, Balancing::RoundRobin, 0, 0)
                .unwrap()
                .0
                .port,
            3
        );
        for _ in 0..3 {
            b.health("127.0.0.1:1").failed(0);
        }
        for turn in 0..4 {
            assert_eq!(
                b.pick(&all, &[], Balancing::LeastOutstanding, turn, 500)
                    .unwrap()
                    .0
                    .port,
                3
            );
        }
        for _ in 0..3 {
            b.health("127.0.0.1:3").failed(0);
        }
        assert!(
            b.pick(&all, &[], Balancing::RoundRobin, 0, 500).is_some(),
            "all ejected: use them anyway"
        );
        assert_eq!(
            b.pick(&all, &[], Balancing::RoundRobin, 0, 5000)
                .map(|p| p.0.port),
            Some(1),
            "back by itself after the backoff"
        );
    }

    #[test]
    fn an_in_flight_request_is_counted_until_its_guard_drops_even_when_abandoned() {
        let health = InstanceHealth::default();
        let first = health.in_flight();
        {
            let _second = health.in_flight();
            assert_eq!(health.outstanding.load(Ordering::Relaxed), 2);
        }
        assert_eq!(health.outstanding.load(Ordering::Relaxed), 1);
        // A request future dropped mid-await (the client hung up) drops its guard.
        let abandoned = async {
            let _guard = health.in_flight();
            std::future::pending::<()>().await;
        };
        let mut abandoned = Box::pin(abandoned);
        let waker = std::task::Waker::noop();
        let _ = abandoned
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker));
        assert_eq!(health.outstanding.load(Ordering::Relaxed), 2);
        drop(abandoned);
        drop(first);
        assert_eq!(health.outstanding.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn least_outstanding_prefers_the_idle_instance() {
        let b = Balancer::default();
        let all = vec![instance(1, "UP"), instance(2, "UP")];
        b.health("127.0.0.1:1")
            .outstanding
            .store(50, Ordering::Relaxed);
        let picks = (0..200)
            .filter(|t| {
                b.pick(&all, &[], Balancing::LeastOutstanding, *t, 0)
                    .unwrap()
                    .0
                    .port
                    == 2
            })
            .count();
        // With two instances P2C picks the idle one unless both draws hit the busy one.
        assert!(picks > 120, "{picks} of 200 went to the idle instance");
    }

    #[test]
    fn the_retry_budget_holds_retries_to_a_fifth_of_traffic_per_service() {
        let b = Balancer::default();
        let t = 1_000_000_000_u64;
        let orders = b.budget("orders");
        assert_eq!(
            (0..100).filter(|_| orders.withdraw(t)).count(),
            10,
            "reserve"
        );
        for _ in 0..100 {
            orders.deposit(t);
        }
        assert_eq!((0..100).filter(|_| orders.withdraw(t)).count(), 20);
        // Another service's budget is its own.
        let payments = b.budget("payments");
        assert_eq!((0..100).filter(|_| payments.withdraw(t)).count(), 10);
        assert!(Arc::ptr_eq(&orders, &b.budget("orders")));
    }

    #[test]
    fn the_retry_budget_forgets_what_left_the_window() {
        let budget = RetryBudget::default();
        let t = 1_000_000_000_u64;
        for _ in 0..1000 {
            budget.deposit(t);
        }
        // Within the window, the deposits count...
        assert!((0..150).all(|_| budget.withdraw(t + 5_000)));
        // ...and once they left it, a quiet spell has banked nothing but the reserve.
        let later = t + 16_000;
        assert_eq!((0..100).filter(|_| budget.withdraw(later)).count(), 10);
    }
}
