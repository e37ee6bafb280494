//! Choosing an instance, and remembering how each one behaves.
//!
//! Per instance address the gateway keeps the requests in flight (for
//! least-outstanding balancing) and consecutive failures (connect errors and 5xx). After
//! `EJECT_AFTER` consecutive failures an instance is ejected for a backoff that doubles
//! with each ejection (1 s, 2 s, 4 s... at most 30 s) and comes back by itself when it
//! runs out; one success resets everything. When every instance is ejected they are
//! all used again: some traffic to a maybe-sick instance beats a certain 503.
//!
//! Retries draw on a budget: each request deposits a fifth of a retry, each retry
//! spends one, with a reserve of ten, so retries never multiply the load of a sick
//! upstream by more than 20 %.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering},
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
}

impl InstanceHealth {
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

/// Instance health by address, and the retry budget.
#[derive(Debug)]
pub struct Balancer {
    /// Read on every request without a lock; copied on the rare insert of a new address.
    health: ArcSwap<HashMap<String, Arc<InstanceHealth>>>,
    /// Tenths of a retry available.
    budget: AtomicI64,
}

impl Default for Balancer {
    fn default() -> Self {
        Self {
            health: ArcSwap::from_pointee(HashMap::new()),
            budget: AtomicI64::new(RESERVE),
        }
    }
}

/// Ten retries in reserve, in tenths.
const RESERVE: i64 = 100;
const BUDGET_CAP: i64 = 1000;

impl Balancer {
    pub fn health(&self, address: &str) -> Arc<InstanceHealth> {
        if let Some(known) = self.health.load().get(address) {
            return known.clone();
        }
        let mut created = None;
        self.health.rcu(|current| {
            let mut next = (**current).clone();
            let entry = next.entry(address.to_owned()).or_default().clone();
            created = Some(entry);
            next
        });
        created.unwrap_or_default()
    }

    /// Picks an `UP` instance not in `tried`, avoiding ejected ones while any other
    /// is left. `turn` drives round robin.
    pub fn pick<'a>(
        &self,
        instances: &'a [ServiceInstance],
        tried: &[String],
        balancing: Balancing,
        turn: usize,
        now_ms: u64,
    ) -> Option<(&'a ServiceInstance, Arc<InstanceHealth>)> {
        let candidates: Vec<(&ServiceInstance, Arc<InstanceHealth>)> = instances
            .iter()
            .filter(|i| i.is_up() && !tried.contains(&i.address))
            .map(|i| (i, self.health(&i.address)))
            .collect();
        let healthy: Vec<&(&ServiceInstance, Arc<InstanceHealth>)> = candidates
            .iter()
            .filter(|(_, h)| !h.is_ejected(now_ms))
            .collect();
        let pool: Vec<&(&ServiceInstance, Arc<InstanceHealth>)> = if healthy.is_empty() {
            candidates.iter().collect()
        } else {
            healthy
        };
        if pool.is_empty() {
            return None;
        }
        let chosen = match balancing {
            Balancing::RoundRobin => pool[turn % pool.len()],
            Balancing::LeastOutstanding => {
                let a = pool[rand::random_range(0..pool.len())];
                let b = pool[rand::random_range(0..pool.len())];
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

    /// Every request earns a fifth of a retry.
    pub fn deposit(&self) {
        let _ = self
            .budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some((b + 2).min(BUDGET_CAP))
            });
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        self.budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b >= 10).then_some(b - 10)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(port: u16, status: &str) -> ServiceInstance {
        ServiceInstance {
            service: "s".into(),
            instance_id: format!("i{port}"),
            host: "127.0.0.1".into(),
            port,
            address: format!("127.0.0.1:{port}"),
            status: status.into(),
            metadata: Default::default(),
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
    fn the_retry_budget_holds_retries_to_a_fifth_of_traffic() {
        let b = Balancer::default();
        let reserve = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(reserve, 10);
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!((0..100).filter(|_| b.withdraw()).count(), 20);
    }
}
