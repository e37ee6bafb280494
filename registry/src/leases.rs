//! The lease table: every live instance, its lease, and the stream of changes.
//!
//! Reads never wait for writers: the whole table is an immutable [`Snapshot`] behind
//! an `ArcSwap`, replaced (not mutated) by each write. Heartbeats, the hot path, take
//! no lock at all: a lease's expiry is an atomic in a [`LeaseClock`] shared by every
//! version of the instance's record, so renewing is a lookup in the current snapshot
//! and one atomic store. Writes that change what readers see (register, deregister,
//! status, expiry) are serialised by one mutex that is never held across I/O or an
//! `.await`, rebuild only the affected service's map, and publish the new snapshot,
//! the new index on a `watch` channel (blocking queries) and each change on a
//! `broadcast` channel (streams).
//!
//! A lease expires exactly at its end: from that instant readers no longer see the
//! instance and its heartbeat answers "unknown", and the reaper removes it on its next
//! tick (every 100 ms by default), which is when watchers hear of it. The one
//! exception is self-preservation: when far more leases expire within one window than
//! the configured share of all instances, the registry itself is the likely cause (cut
//! off from its clients), so it keeps the expired instances for a bounded time,
//! accepts their late heartbeats, and says why.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::{
    model::{Registration, ServiceName, Status},
    peers::{Fanout, Outcome, Record, ReplicaAction},
};

/// Limits and timings of the table; the `leases` section of the registry's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseSettings {
    /// Shortest lease granted; shorter requests are raised to it.
    pub min_seconds: u32,
    /// Longest lease granted; longer requests are cut to it.
    pub max_seconds: u32,
    /// The lease of a registration that asks for none.
    pub default_seconds: u32,
    /// How often expired leases are removed and watchers told.
    pub reaper_interval_ms: u64,
    /// How long a change stays in the Eureka delta (Eureka keeps three minutes).
    pub delta_retention_seconds: u64,
    pub self_preservation: SelfPreservationSettings,
    /// Instances one service may have at once; a registration beyond is refused, so
    /// one misbehaving or hostile client cannot grow the table without bound.
    pub max_instances_per_service: usize,
    /// Watch streams and blocking queries open at once (each holds its connection
    /// busy); past it, 503. Keep it well under `http.limits.max_connections`, so that
    /// heartbeats and registrations always find room.
    pub max_watchers: usize,
    /// The same from one client address (an IPv6 client by its /64).
    pub max_watchers_per_client: usize,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            min_seconds: 1,
            max_seconds: 300,
            default_seconds: 10,
            reaper_interval_ms: 100,
            delta_retention_seconds: 180,
            self_preservation: SelfPreservationSettings::default(),
            max_instances_per_service: 1000,
            max_watchers: 1024,
            max_watchers_per_client: 64,
        }
    }
}

/// When expiries are so many that the registry, not the instances, is suspect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelfPreservationSettings {
    pub enabled: bool,
    /// The window in which expiries are counted.
    pub window_seconds: u64,
    /// Share of all instances whose leases must expire within the window.
    pub expiry_fraction: f64,
    /// And at least this many, so small deployments are never held back.
    pub min_expiries: usize,
    /// Self-preservation ends by itself after this long, whatever happens.
    pub max_duration_seconds: u64,
}

impl Default for SelfPreservationSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            window_seconds: 15,
            expiry_fraction: 0.25,
            min_expiries: 3,
            max_duration_seconds: 120,
        }
    }
}

/// A lease's timing, shared by every version of an instance's record so a heartbeat
/// never races a status change.
#[derive(Debug)]
pub struct LeaseClock {
    expires_at: AtomicU64,
    last_renewal: AtomicU64,
}

impl LeaseClock {
    fn new(now: u64, duration_ms: u64) -> Self {
        Self {
            expires_at: AtomicU64::new(now.saturating_add(duration_ms)),
            last_renewal: AtomicU64::new(now),
        }
    }

    pub fn expires_at(&self) -> u64 {
        self.expires_at.load(Ordering::Acquire)
    }

    pub fn last_renewal(&self) -> u64 {
        self.last_renewal.load(Ordering::Acquire)
    }

    fn renew(&self, now: u64, duration_ms: u64) {
        self.last_renewal.store(now, Ordering::Release);
        self.expires_at
            .store(now.saturating_add(duration_ms), Ordering::Release);
    }

    /// A peer's record says exactly when the lease ends (it may have been shortened).
    fn set(&self, expires_at: u64, last_renewal: u64) {
        self.last_renewal.store(last_renewal, Ordering::Release);
        self.expires_at.store(expires_at, Ordering::Release);
    }

    /// A peer's renewal: the lease ends at the later of the two ends, so renewals
    /// that arrive out of order never shorten it.
    fn extend_to(&self, expires_at: u64, last_renewal: u64) {
        self.last_renewal.fetch_max(last_renewal, Ordering::AcqRel);
        self.expires_at.fetch_max(expires_at, Ordering::AcqRel);
    }
}

/// One version of an instance's record. Immutable but for its [`LeaseClock`].
#[derive(Debug)]
pub struct Instance {
    /// What was registered, with the lease already clamped.
    pub registration: Registration,
    /// An operator's override, kept across heartbeats and re-registrations.
    pub override_status: Option<Status>,
    /// Epoch milliseconds.
    pub registered_at: u64,
    /// Epoch milliseconds of the last change other than a renewal.
    pub updated_at: u64,
    /// The record's version, Eureka's "last dirty time": a stamp in microseconds,
    /// unique on the node that made the change. Between peers the higher one wins.
    pub dirty: u64,
    pub clock: Arc<LeaseClock>,
}

impl Instance {
    /// The override when set, else what the instance reports.
    pub fn status(&self) -> Status {
        self.override_status.unwrap_or(self.registration.status)
    }

    pub fn lease_ms(&self) -> u64 {
        u64::from(self.registration.lease_seconds) * 1000
    }

    pub fn expires_at(&self) -> u64 {
        self.clock.expires_at()
    }

    fn with(
        &self,
        f: impl FnOnce(&mut Registration, &mut Option<Status>),
        now: u64,
        dirty: u64,
    ) -> Instance {
        let mut registration = self.registration.clone();
        let mut override_status = self.override_status;
        f(&mut registration, &mut override_status);
        Instance {
            registration,
            override_status,
            registered_at: self.registered_at,
            updated_at: now,
            dirty,
            clock: self.clock.clone(),
        }
    }

    /// The whole record, as peers exchange it.
    pub fn record(&self) -> Record {
        let r = &self.registration;
        Record {
            service: r.service.to_string(),
            instance_id: r.instance_id.clone(),
            host: r.host.clone(),
            port: r.port,
            status: r.status,
            override_status: self.override_status,
            lease_seconds: r.lease_seconds,
            health_url: r.health_url.clone(),
            metadata: r.metadata.clone(),
            eureka: r.eureka.clone(),
            registered_at: self.registered_at,
            updated_at: self.updated_at,
            dirty: self.dirty,
            expires_at: self.clock.expires_at(),
            last_renewal: self.clock.last_renewal(),
        }
    }
}

/// What happened to an instance, in Eureka's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Added,
    Modified,
    Deleted,
}

/// One change, as watchers and the Eureka delta see it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The table's index after this change.
    pub index: u64,
    /// Epoch milliseconds.
    pub at: u64,
    pub action: Action,
    /// Why, in a word: `registered`, `status`, `override`, `deregistered`, `expired`.
    pub cause: &'static str,
    /// The record after the change (before it, for a deletion).
    pub instance: Arc<Instance>,
}

/// Self-preservation while it lasts, with the numbers that started it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Preservation {
    pub since: u64,
    /// It ends by itself at this time at the latest.
    pub until: u64,
    pub expired_in_window: usize,
    pub instances: usize,
    pub threshold: usize,
    pub window_seconds: u64,
}

impl Preservation {
    pub fn reason(&self) -> String {
        format!(
            "{} of {} leases expired within {}s (threshold {}): the registry is more likely cut \
             off than the instances dead, so expired instances are kept until renewals resume \
             or at most until the time limit",
            self.expired_in_window, self.instances, self.window_seconds, self.threshold
        )
    }
}

/// One service's instances by id.
pub type ServiceInstances = BTreeMap<String, Arc<Instance>>;

/// The whole table at one index. Cheap to hold: everything inside is shared.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub index: u64,
    pub services: BTreeMap<ServiceName, Arc<ServiceInstances>>,
    /// Changes within the delta retention, oldest first.
    pub changes: Arc<VecDeque<Arc<Change>>>,
    pub preservation: Option<Preservation>,
    /// How the last self-preservation ended, for the dashboard.
    pub last_preservation_end: Option<(u64, &'static str)>,
}

impl Snapshot {
    /// Whether readers see `instance` at `now`: its lease runs, or self-preservation
    /// keeps it.
    pub fn visible(&self, instance: &Instance, now: u64) -> bool {
        instance.expires_at() > now || self.preservation.is_some()
    }

    /// The visible instances of `service`.
    pub fn instances<'a>(
        &'a self,
        service: &ServiceName,
        now: u64,
    ) -> impl Iterator<Item = &'a Arc<Instance>> + 'a {
        self.services
            .get(service)
            .into_iter()
            .flat_map(|instances| instances.values())
            .filter(move |i| self.visible(i, now))
    }

    /// Every visible instance, service by service.
    pub fn all(&self, now: u64) -> impl Iterator<Item = &Arc<Instance>> + '_ {
        self.services
            .values()
            .flat_map(|instances| instances.values())
            .filter(move |i| self.visible(i, now))
    }

    pub fn instance(&self, service: &ServiceName, id: &str, now: u64) -> Option<&Arc<Instance>> {
        self.services
            .get(service)
            .and_then(|instances| instances.get(id))
            .filter(|i| self.visible(i, now))
    }

    /// Finds an instance by id in any service (Eureka's `/instances/{id}`).
    pub fn find(&self, id: &str, now: u64) -> Option<&Arc<Instance>> {
        self.services
            .values()
            .find_map(|instances| instances.get(id))
            .filter(|i| self.visible(i, now))
    }
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("no instance {id} of {service} is registered; register it again")]
    Unknown { service: String, id: String },
}

/// Renewals per second over the last minute, without locks.
#[derive(Debug)]
struct RenewalWindow {
    counts: [AtomicU64; 60],
    seconds: [AtomicU64; 60],
}

impl RenewalWindow {
    fn new() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            seconds: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn record(&self, now: u64) {
        let second = now / 1000;
        let slot = (second % 60) as usize;
        if self.seconds[slot].swap(second, Ordering::AcqRel) != second {
            self.counts[slot].store(0, Ordering::Release);
        }
        self.counts[slot].fetch_add(1, Ordering::AcqRel);
    }

    fn last_minute(&self, now: u64) -> u64 {
        let second = now / 1000;
        (0..60)
            .filter(|&slot| second.saturating_sub(self.seconds[slot].load(Ordering::Acquire)) < 60)
            .map(|slot| self.counts[slot].load(Ordering::Acquire))
            .sum()
    }
}

/// Writer-side bookkeeping, only touched under the write lock.
#[derive(Debug, Default)]
struct WriterState {
    /// When each recent expiry happened, for the self-preservation window.
    recent_expiries: VecDeque<u64>,
    /// No new self-preservation before this time (after one ended by its time limit).
    cooldown_until: u64,
    /// Deregistered instances, by key, with the deletion's dirty stamp: a peer's
    /// record older than the deletion arriving late must not bring the instance back.
    tombstones: std::collections::HashMap<(ServiceName, String), u64>,
    /// When each tombstone was laid, with its stamp, oldest first, for pruning.
    tombstone_order: VecDeque<(u64, (ServiceName, String), u64)>,
}

/// How long a deregistration is remembered against late peer records: far longer
/// than any replication delay while peers are up.
const TOMBSTONE_MS: u64 = 300_000;

impl WriterState {
    fn bury(&mut self, key: (ServiceName, String), dirty: u64, now: u64) {
        let stamp = self.tombstones.entry(key.clone()).or_insert(0);
        *stamp = (*stamp).max(dirty);
        self.tombstone_order.push_back((now, key, dirty));
        self.prune_tombstones(now);
    }

    /// Forgets deletions older than [`TOMBSTONE_MS`]; a key buried again since keeps
    /// its newer stamp.
    fn prune_tombstones(&mut self, now: u64) {
        while let Some((at, _, _)) = self.tombstone_order.front()
            && at + TOMBSTONE_MS <= now
        {
            if let Some((_, old, dirty)) = self.tombstone_order.pop_front()
                && self.tombstones.get(&old) == Some(&dirty)
            {
                self.tombstones.remove(&old);
            }
        }
    }

    /// The stamp a deletion of `key` must beat.
    fn tombstone(&self, key: &(ServiceName, String)) -> u64 {
        self.tombstones.get(key).copied().unwrap_or(0)
    }
}

/// Stamps that order an instance's versions, a hybrid logical clock: epoch
/// microseconds in the high bits, never behind any stamp this node has made or seen
/// from a peer, and this node's own bits in the low ten, so stamps of two nodes never
/// tie and a change made here after one from a peer always wins, whatever the two
/// wall clocks say.
#[derive(Debug)]
struct DirtyClock {
    /// The highest microsecond part made or seen.
    last: AtomicU64,
    node_bits: u64,
}

const NODE_BITS: u32 = 10;

impl DirtyClock {
    fn new(node_bits: u64) -> Self {
        Self {
            last: AtomicU64::new(0),
            node_bits: node_bits & ((1 << NODE_BITS) - 1),
        }
    }

    /// A stamp above every stamp made or seen here, and above `floor`.
    fn next_above(&self, floor: u64) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or_default();
        let floor_micros = floor >> NODE_BITS;
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let next = now.max(last + 1).max(floor_micros + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return (next << NODE_BITS) | self.node_bits,
                Err(seen) => last = seen,
            }
        }
    }

    /// A peer's stamp: later stamps made here are above it.
    fn observe(&self, stamp: u64) {
        self.last.fetch_max(stamp >> NODE_BITS, Ordering::AcqRel);
    }
}

/// The registry's instances and leases.
#[derive(Debug)]
pub struct LeaseTable {
    settings: LeaseSettings,
    snapshot: ArcSwap<Snapshot>,
    writer: Mutex<WriterState>,
    index: watch::Sender<u64>,
    events: broadcast::Sender<Arc<Change>>,
    renewals: RenewalWindow,
    /// Cancelled when the registry shuts down, so long polls and streams end instead
    /// of holding the graceful shutdown open.
    closing: tokio_util::sync::CancellationToken,
    /// This node's name among its peers, new at every start.
    node: String,
    /// Room for watch streams and blocking queries.
    watchers: Arc<crate::watchers::Watchers>,
    dirty: DirtyClock,
    /// Where the writes clients make here go, to reach every peer.
    fanout: Option<Arc<Fanout>>,
    /// Whether the table is complete: false while a node that has peers copies the
    /// table from one of them at start-up.
    ready: std::sync::atomic::AtomicBool,
}

impl LeaseTable {
    pub fn new(settings: LeaseSettings) -> Self {
        Self::replicating(settings, None)
    }

    /// A table whose client writes are also queued, by `fanout`, for every peer. It
    /// is not ready until [`LeaseTable::mark_ready`] (after the start-up sync).
    pub fn replicating(settings: LeaseSettings, fanout: Option<Arc<Fanout>>) -> Self {
        let (index, _) = watch::channel(0);
        let (events, _) = broadcast::channel(4096);
        let ready = std::sync::atomic::AtomicBool::new(fanout.is_none());
        let node_bits = rand_bits();
        let watchers =
            crate::watchers::Watchers::new(settings.max_watchers, settings.max_watchers_per_client);
        Self {
            settings,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(WriterState::default()),
            index,
            events,
            renewals: RenewalWindow::new(),
            closing: tokio_util::sync::CancellationToken::new(),
            node: format!("{:08x}{:08x}", std::process::id(), node_bits & 0xffff_ffff),
            watchers,
            dirty: DirtyClock::new(node_bits),
            fanout,
            ready,
        }
    }

    /// This node's name among its peers.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the table is complete enough to answer reads.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The start-up sync is over: reads may be answered.
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// The peers and how replication to each goes.
    pub fn peers(&self) -> Vec<serde_json::Value> {
        self.fanout
            .iter()
            .flat_map(|f| f.links())
            .map(|link| link.view())
            .collect()
    }

    fn replicate(&self, action: impl FnOnce() -> ReplicaAction) {
        if let Some(fanout) = &self.fanout {
            fanout.push(action());
        }
    }

    /// Ends every blocking query and watch stream.
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// Resolves once [`LeaseTable::close`] was called.
    pub async fn closed(&self) {
        self.closing.cancelled().await;
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// The current table. Never blocks.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Follows the table's index: wakes on every change.
    pub fn watch_index(&self) -> watch::Receiver<u64> {
        self.index.subscribe()
    }

    /// Every change from now on. A receiver that falls more than 4096 changes behind
    /// is told it lagged and should re-read the snapshot.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.events.subscribe()
    }

    /// Room for one more watch stream or blocking query from `client`.
    pub fn admit_watcher(
        &self,
        client: std::net::IpAddr,
    ) -> Result<crate::watchers::Place, crate::watchers::Full> {
        self.watchers.admit(client)
    }

    pub fn watchers(&self) -> usize {
        self.events.receiver_count() + self.index.receiver_count()
    }

    pub fn renewals_last_minute(&self, now: u64) -> u64 {
        self.renewals.last_minute(now)
    }

    /// The lease actually granted for a requested length.
    pub fn clamp_lease(&self, requested: Option<u32>) -> u32 {
        requested
            .unwrap_or(self.settings.default_seconds)
            .clamp(self.settings.min_seconds, self.settings.max_seconds)
    }

    /// `Err(cap)` when registering `instance_id` would take `service` past
    /// `max_instances_per_service` (re-registering a listed instance never does).
    pub fn check_capacity(
        &self,
        service: &ServiceName,
        instance_id: &str,
        now: u64,
    ) -> Result<(), usize> {
        let cap = self.settings.max_instances_per_service;
        let snapshot = self.snapshot();
        let listed = snapshot
            .services
            .get(service)
            .and_then(|instances| instances.get(instance_id))
            .is_some_and(|i| snapshot.visible(i, now));
        if !listed && snapshot.instances(service, now).count() >= cap {
            return Err(cap);
        }
        Ok(())
    }

    /// Registers an instance, or replaces its record when it re-registers (keeping an
    /// operator's override, which survives until removed).
    pub fn register(&self, mut registration: Registration, now: u64) -> Arc<Instance> {
        registration.lease_seconds = self.clamp_lease(Some(registration.lease_seconds));
        let lease_ms = u64::from(registration.lease_seconds) * 1000;
        self.write(now, |snapshot, state| {
            let key = (
                registration.service.clone(),
                registration.instance_id.clone(),
            );
            let listed = snapshot
                .services
                .get(&registration.service)
                .and_then(|instances| instances.get(&registration.instance_id));
            // Stamped under the lock, above the version it replaces and any deletion
            // of it, so the newest write here is the newest everywhere.
            let dirty = self
                .dirty
                .next_above(listed.map_or(0, |i| i.dirty).max(state.tombstone(&key)));
            let previous = listed.filter(|i| snapshot.visible(i, now));
            let (instance, action) = match previous {
                Some(previous) => {
                    previous.clock.renew(now, lease_ms);
                    let instance = Instance {
                        registration,
                        override_status: previous.override_status,
                        registered_at: previous.registered_at,
                        updated_at: now,
                        dirty,
                        clock: previous.clock.clone(),
                    };
                    (instance, Action::Modified)
                }
                None => (
                    Instance {
                        registration,
                        override_status: None,
                        registered_at: now,
                        updated_at: now,
                        dirty,
                        clock: Arc::new(LeaseClock::new(now, lease_ms)),
                    },
                    Action::Added,
                ),
            };
            metrics::counter!("registry_registrations_total").increment(1);
            let instance = Arc::new(instance);
            state.tombstones.remove(&key);
            // Queued under the write lock, so peers get this node's writes in the
            // order it applied them.
            self.replicate(|| ReplicaAction::upsert(&instance, "registered", now));
            (instance.clone(), vec![(instance, action, "registered")])
        })
    }

    /// Renews a lease. Lock-free. An unknown or already expired instance is an error,
    /// which tells the client to register again.
    pub fn renew(
        &self,
        service: &ServiceName,
        id: &str,
        now: u64,
    ) -> Result<Arc<Instance>, LeaseError> {
        let snapshot = self.snapshot.load();
        let instance = snapshot
            .instance(service, id, now)
            .cloned()
            .ok_or_else(|| unknown(service, id))?;
        instance.clock.renew(now, instance.lease_ms());
        self.renewals.record(now);
        metrics::counter!("registry_renewals_total").increment(1);
        self.replicate(|| ReplicaAction::Renew {
            service: service.to_string(),
            instance_id: id.to_owned(),
            dirty: instance.dirty,
            expires_at: instance.clock.expires_at(),
            last_renewal: instance.clock.last_renewal(),
            at: now,
        });
        Ok(instance)
    }

    /// Removes an instance at its own request.
    pub fn deregister(
        &self,
        service: &ServiceName,
        id: &str,
        now: u64,
    ) -> Result<Arc<Instance>, LeaseError> {
        let result = self.write(now, |snapshot, state| {
            match snapshot.instance(service, id, now) {
                None => (Err(unknown(service, id)), Vec::new()),
                Some(current) => {
                    // A deletion has a stamp of its own, so a peer's older record
                    // arriving late loses to it; stamped and queued under the lock,
                    // so a re-registration racing it is ordered after it everywhere.
                    let dirty = self.dirty.next_above(current.dirty);
                    state.bury((service.clone(), id.to_owned()), dirty, now);
                    self.replicate(|| ReplicaAction::Delete {
                        service: service.to_string(),
                        instance_id: id.to_owned(),
                        dirty,
                        at: now,
                    });
                    (
                        Ok(current.clone()),
                        vec![(current.clone(), Action::Deleted, "deregistered")],
                    )
                }
            }
        });
        if result.is_ok() {
            metrics::counter!("registry_deregistrations_total").increment(1);
        }
        result
    }

    /// Sets the status the instance reports about itself (e.g. `DRAINING`).
    pub fn set_status(
        &self,
        service: &ServiceName,
        id: &str,
        status: Status,
        now: u64,
    ) -> Result<Arc<Instance>, LeaseError> {
        self.update(service, id, now, |current| {
            if current.registration.status == status {
                return None;
            }
            let next = current.with(
                |r, _| r.status = status,
                now,
                self.dirty.next_above(current.dirty),
            );
            Some((Arc::new(next), Action::Modified, "status"))
        })
    }

    /// Sets (`Some`) or removes (`None`) an operator's override.
    pub fn set_override(
        &self,
        service: &ServiceName,
        id: &str,
        status: Option<Status>,
        now: u64,
    ) -> Result<Arc<Instance>, LeaseError> {
        self.update(service, id, now, |current| {
            if current.override_status == status {
                return None;
            }
            let next = current.with(
                |_, o| *o = status,
                now,
                self.dirty.next_above(current.dirty),
            );
            Some((Arc::new(next), Action::Modified, "override"))
        })
    }

    /// Applies `change` to one existing instance; `None` from it means "no change".
    fn update(
        &self,
        service: &ServiceName,
        id: &str,
        now: u64,
        change: impl FnOnce(&Arc<Instance>) -> Option<(Arc<Instance>, Action, &'static str)>,
    ) -> Result<Arc<Instance>, LeaseError> {
        self.write(now, |snapshot, _| {
            match snapshot.instance(service, id, now) {
                None => (Err(unknown(service, id)), Vec::new()),
                Some(current) => match change(current) {
                    None => (Ok(current.clone()), Vec::new()),
                    Some(changed) => {
                        self.replicate(|| ReplicaAction::upsert(&changed.0, changed.2, now));
                        (Ok(changed.0.clone()), vec![changed])
                    }
                },
            }
        })
    }

    /// Applies what a peer replicated, in order, as one write: records newer than
    /// what this node holds replace it (the higher dirty stamp wins, as Eureka's last
    /// dirty time does), renewals extend leases, deletions remove older records and
    /// are remembered against late ones. Nothing applied here is replicated again, so
    /// peers never echo each other. Returns one outcome per action.
    pub fn apply_replicated(&self, actions: &[ReplicaAction], now: u64) -> Vec<Outcome> {
        self.apply_from_peer(actions, now).0
    }

    /// [`LeaseTable::apply_replicated`], with what this node holds that beat the
    /// peer's writes (its newer record, or the deletion), for every `Stale` outcome:
    /// the peer applies them, so both end with the winner.
    pub fn apply_from_peer(
        &self,
        actions: &[ReplicaAction],
        now: u64,
    ) -> (Vec<Outcome>, Vec<ReplicaAction>) {
        type Key = (ServiceName, String);
        self.write(now, |snapshot, state| {
            // What this batch changed so far, over the snapshot it started from.
            let mut overlay: std::collections::HashMap<Key, Option<Arc<Instance>>> =
                std::collections::HashMap::new();
            let lookup = |overlay: &std::collections::HashMap<Key, Option<Arc<Instance>>>,
                          key: &Key| {
                match overlay.get(key) {
                    Some(seen) => seen.clone(),
                    None => snapshot
                        .services
                        .get(&key.0)
                        .and_then(|m| m.get(&key.1))
                        .cloned(),
                }
            };
            let mut changes = Vec::new();
            let mut outcomes = Vec::with_capacity(actions.len());
            let mut newer = Vec::new();
            for action in actions {
                let Some(key) = action.key() else {
                    outcomes.push(Outcome::Invalid);
                    continue;
                };
                let existing = lookup(&overlay, &key);
                if let Some(stamp) = action.dirty() {
                    self.dirty.observe(stamp);
                }
                let outcome = match action {
                    ReplicaAction::Upsert { record, cause, .. } => {
                        if state.tombstone(&key) >= record.dirty {
                            newer.push(ReplicaAction::Delete {
                                service: key.0.to_string(),
                                instance_id: key.1.clone(),
                                dirty: state.tombstone(&key),
                                at: now,
                            });
                            Outcome::Stale
                        } else if let Some(e) =
                            existing.as_ref().filter(|e| e.dirty >= record.dirty)
                        {
                            if e.dirty == record.dirty {
                                e.clock.extend_to(record.expires_at, record.last_renewal);
                                Outcome::Applied
                            } else {
                                newer.push(ReplicaAction::upsert(e, "registered", now));
                                Outcome::Stale
                            }
                        } else if record.expires_at <= now && snapshot.preservation.is_none() {
                            Outcome::Expired
                        } else {
                            match record.registration(&key.0) {
                                None => Outcome::Invalid,
                                Some(registration) => {
                                    let visible =
                                        existing.as_ref().is_some_and(|e| snapshot.visible(e, now));
                                    let clock = match &existing {
                                        Some(e) => {
                                            // A record renewed no later than here
                                            // carries an older lease end: it extends
                                            // the lease, never shortens it. A newer
                                            // one (a re-registration, perhaps with a
                                            // shorter lease) is copied exactly.
                                            if record.last_renewal >= e.clock.last_renewal() {
                                                e.clock.set(record.expires_at, record.last_renewal);
                                            } else {
                                                e.clock.extend_to(
                                                    record.expires_at,
                                                    record.last_renewal,
                                                );
                                            }
                                            e.clock.clone()
                                        }
                                        None => Arc::new(LeaseClock {
                                            expires_at: AtomicU64::new(record.expires_at),
                                            last_renewal: AtomicU64::new(record.last_renewal),
                                        }),
                                    };
                                    let instance = Arc::new(Instance {
                                        registration,
                                        override_status: record.override_status,
                                        registered_at: record.registered_at,
                                        updated_at: record.updated_at,
                                        dirty: record.dirty,
                                        clock,
                                    });
                                    state.tombstones.remove(&key);
                                    overlay.insert(key.clone(), Some(instance.clone()));
                                    let action = if visible {
                                        Action::Modified
                                    } else {
                                        Action::Added
                                    };
                                    changes.push((instance, action, known_cause(cause)));
                                    Outcome::Applied
                                }
                            }
                        }
                    }
                    ReplicaAction::Renew {
                        dirty,
                        expires_at,
                        last_renewal,
                        ..
                    } => match existing.filter(|e| snapshot.visible(e, now)) {
                        None => Outcome::Unknown,
                        Some(e) => {
                            e.clock.extend_to(*expires_at, *last_renewal);
                            metrics::counter!("registry_replicated_renewals_total").increment(1);
                            if e.dirty < *dirty {
                                Outcome::Outdated
                            } else {
                                Outcome::Applied
                            }
                        }
                    },
                    ReplicaAction::Delete { dirty, .. } => match existing {
                        Some(e) if e.dirty > *dirty => {
                            newer.push(ReplicaAction::upsert(&e, "registered", now));
                            Outcome::Stale
                        }
                        found => {
                            state.bury(key.clone(), *dirty, now);
                            if let Some(e) = found {
                                overlay.insert(key.clone(), None);
                                changes.push((e, Action::Deleted, "deregistered"));
                            }
                            Outcome::Applied
                        }
                    },
                };
                outcomes.push(outcome);
            }
            ((outcomes, newer), changes)
        })
    }

    /// Every listed instance's record and every remembered deletion: what a peer
    /// that starts copies.
    pub fn export(&self, now: u64) -> (Vec<Record>, Vec<(String, String, u64)>) {
        // Under the write lock, so the records and deletions are of one moment.
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        writer.prune_tombstones(now);
        let snapshot = self.snapshot();
        let records = snapshot.all(now).map(|i| i.record()).collect();
        let tombstones = writer
            .tombstones
            .iter()
            .map(|((service, id), dirty)| (service.to_string(), id.clone(), *dirty))
            .collect();
        (records, tombstones)
    }

    /// The reaper's tick: removes instances whose lease ended, unless self-preservation
    /// holds them. Returns how many were removed.
    pub fn expire(&self, now: u64) -> usize {
        let snapshot = self.snapshot.load_full();
        let due: Vec<Arc<Instance>> = snapshot
            .services
            .values()
            .flat_map(|instances| instances.values())
            .filter(|i| i.expires_at() <= now)
            .cloned()
            .collect();
        if due.is_empty() && snapshot.preservation.is_none() {
            return 0;
        }
        let settings = &self.settings.self_preservation;
        self.write_expiries(now, |snapshot, state, preservation| {
            // Re-check under the lock: a heartbeat may have renewed since the scan.
            let due: Vec<Arc<Instance>> = due
                .iter()
                .filter(|i| {
                    i.expires_at() <= now
                        && snapshot
                            .services
                            .get(&i.registration.service)
                            .and_then(|m| m.get(&i.registration.instance_id))
                            .is_some_and(|current| Arc::ptr_eq(&current.clock, &i.clock))
                })
                .cloned()
                .collect();
            let window_ms = settings.window_seconds * 1000;
            while state
                .recent_expiries
                .front()
                .is_some_and(|&t| t + window_ms <= now)
            {
                state.recent_expiries.pop_front();
            }
            // The population the window saw: what is registered now plus what the
            // window already evicted, so early evictions do not shrink the base.
            let total: usize = snapshot.services.values().map(|m| m.len()).sum::<usize>()
                + state.recent_expiries.len();
            let threshold = settings
                .min_expiries
                .max((settings.expiry_fraction * total as f64).ceil() as usize);
            let in_window = state.recent_expiries.len() + due.len();

            match preservation.clone() {
                Some(current) => {
                    let ended = if now >= current.until {
                        Some("time limit reached")
                    } else if due.len() < threshold {
                        Some("renewals resumed")
                    } else {
                        None
                    };
                    match ended {
                        Some(why) => {
                            tracing::warn!(why, "self-preservation ended");
                            *preservation = None;
                            state.cooldown_until = now + window_ms;
                            state.recent_expiries.clear();
                            (due, Some(why))
                        }
                        None => (Vec::new(), None),
                    }
                }
                None if settings.enabled
                    && now >= state.cooldown_until
                    && !due.is_empty()
                    && in_window >= threshold =>
                {
                    let entered = Preservation {
                        since: now,
                        until: now + settings.max_duration_seconds * 1000,
                        expired_in_window: in_window,
                        instances: total,
                        threshold,
                        window_seconds: settings.window_seconds,
                    };
                    tracing::warn!(reason = %entered.reason(), "self-preservation started");
                    metrics::counter!("registry_self_preservation_total").increment(1);
                    *preservation = Some(entered);
                    (Vec::new(), None)
                }
                None => {
                    state
                        .recent_expiries
                        .extend(std::iter::repeat_n(now, due.len()));
                    (due, None)
                }
            }
        })
    }

    /// A write: `produce` sees the current snapshot under the write lock and returns
    /// its result and the changes to publish.
    fn write<R>(
        &self,
        now: u64,
        produce: impl FnOnce(
            &Snapshot,
            &mut WriterState,
        ) -> (R, Vec<(Arc<Instance>, Action, &'static str)>),
    ) -> R {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot.load_full();
        let (result, changes) = produce(&current, &mut writer);
        let preservation = current.preservation.clone();
        self.publish(&current, changes, preservation, None, now, &mut writer);
        result
    }

    /// The reaper's write: `decide` picks the instances to delete and updates the
    /// self-preservation state. Returns how many were deleted.
    fn write_expiries(
        &self,
        now: u64,
        decide: impl FnOnce(
            &Snapshot,
            &mut WriterState,
            &mut Option<Preservation>,
        ) -> (Vec<Arc<Instance>>, Option<&'static str>),
    ) -> usize {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot.load_full();
        let mut preservation = current.preservation.clone();
        let (expired, ended) = decide(&current, &mut writer, &mut preservation);
        let removed = expired.len();
        if removed > 0 {
            metrics::counter!("registry_expiries_total").increment(removed as u64);
        }
        let changes = expired
            .into_iter()
            .map(|i| (i, Action::Deleted, "expired"))
            .collect();
        self.publish(&current, changes, preservation, ended, now, &mut writer);
        removed
    }

    /// Builds and installs the next snapshot. Called with the write lock held.
    fn publish(
        &self,
        current: &Snapshot,
        changes: Vec<(Arc<Instance>, Action, &'static str)>,
        preservation: Option<Preservation>,
        preservation_end: Option<&'static str>,
        now: u64,
        _lock: &mut WriterState,
    ) -> Vec<Arc<Change>> {
        if changes.is_empty() && preservation == current.preservation {
            return Vec::new();
        }
        let mut services = current.services.clone();
        let mut index = current.index;
        let retention_ms = self.settings.delta_retention_seconds * 1000;
        let mut log: VecDeque<Arc<Change>> = current
            .changes
            .iter()
            .filter(|c| c.at + retention_ms > now)
            .cloned()
            .collect();
        let mut published = Vec::with_capacity(changes.len());
        for (instance, action, cause) in changes {
            let service = instance.registration.service.clone();
            let mut instances = services
                .get(&service)
                .map(|m| (**m).clone())
                .unwrap_or_default();
            match action {
                Action::Deleted => {
                    instances.remove(&instance.registration.instance_id);
                }
                Action::Added | Action::Modified => {
                    instances.insert(instance.registration.instance_id.clone(), instance.clone());
                }
            }
            if instances.is_empty() {
                services.remove(&service);
            } else {
                services.insert(service, Arc::new(instances));
            }
            index += 1;
            let change = Arc::new(Change {
                index,
                at: now,
                action,
                cause,
                instance,
            });
            log.push_back(change.clone());
            published.push(change);
        }
        if published.is_empty() {
            // Only self-preservation changed; watchers still need to hear of it.
            index += 1;
        }
        while log.len() > 10_000 {
            log.pop_front();
        }
        let last_preservation_end = match preservation_end {
            Some(why) => Some((now, why)),
            None => current.last_preservation_end,
        };
        self.snapshot.store(Arc::new(Snapshot {
            index,
            services,
            changes: Arc::new(log),
            preservation,
            last_preservation_end,
        }));
        for change in &published {
            let _ = self.events.send(change.clone());
        }
        self.index.send_replace(index);
        published
    }
}

/// Bits no other process shares: the standard library seeds its hasher keys from the
/// operating system's randomness.
fn rand_bits() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now_ms());
    hasher.finish()
}

/// A peer's word for why a record changed, as one of ours (watchers see the same
/// causes on every node).
fn known_cause(cause: &str) -> &'static str {
    match cause {
        "registered" => "registered",
        "status" => "status",
        "override" => "override",
        _ => "replicated",
    }
}

fn unknown(service: &ServiceName, id: &str) -> LeaseError {
    LeaseError::Unknown {
        service: service.to_string(),
        id: id.to_owned(),
    }
}

pub use shared::now_ms;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EurekaDetails;

    fn service(name: &str) -> ServiceName {
        ServiceName::parse(name).unwrap()
    }

    fn registration(name: &str, id: &str, lease_seconds: u32) -> Registration {
        Registration {
            service: service(name),
            instance_id: id.into(),
            host: "127.0.0.1".into(),
            port: 8081,
            status: Status::Up,
            lease_seconds,
            health_url: None,
            metadata: BTreeMap::new(),
            eureka: EurekaDetails::default(),
        }
    }

    fn table() -> LeaseTable {
        LeaseTable::new(LeaseSettings::default())
    }

    #[test]
    fn a_lease_expires_exactly_at_its_end() {
        let t = table();
        t.register(registration("orders", "a", 10), 1_000);
        let s = t.snapshot();
        assert!(s.instance(&service("orders"), "a", 10_999).is_some());
        assert!(s.instance(&service("orders"), "a", 11_000).is_none());
        assert_eq!(
            t.renew(&service("orders"), "a", 11_000).unwrap_err(),
            LeaseError::Unknown {
                service: "orders".into(),
                id: "a".into()
            },
            "a heartbeat after the end is for an unknown instance"
        );
    }

    #[test]
    fn renewing_moves_the_end_and_the_reaper_removes_at_it() {
        let t = table();
        t.register(registration("orders", "a", 10), 0);
        t.renew(&service("orders"), "a", 5_000).unwrap();
        assert_eq!(t.expire(14_999), 0);
        let before = t.snapshot().index;
        assert_eq!(t.expire(15_000), 1);
        let s = t.snapshot();
        assert!(s.services.is_empty());
        assert_eq!(s.index, before + 1);
        let last = s.changes.back().unwrap();
        assert_eq!((last.action, last.cause), (Action::Deleted, "expired"));
    }

    #[test]
    fn leases_are_clamped_to_the_configured_bounds() {
        let t = table();
        let a = t.register(registration("orders", "a", 0), 0);
        let b = t.register(registration("orders", "b", 100_000), 0);
        assert_eq!(a.registration.lease_seconds, 1);
        assert_eq!(b.registration.lease_seconds, 300);
    }

    #[test]
    fn an_override_survives_heartbeats_and_re_registration_until_removed() {
        let t = table();
        let orders = service("orders");
        t.register(registration("orders", "a", 10), 0);
        t.set_override(&orders, "a", Some(Status::OutOfService), 1)
            .unwrap();
        t.renew(&orders, "a", 2).unwrap();
        t.register(registration("orders", "a", 10), 3);
        t.set_status(&orders, "a", Status::Up, 4).unwrap();
        let s = t.snapshot();
        let a = s.instance(&orders, "a", 5).unwrap();
        assert_eq!(a.status(), Status::OutOfService);
        assert_eq!(a.registration.status, Status::Up);
        t.set_override(&orders, "a", None, 6).unwrap();
        assert_eq!(
            t.snapshot().instance(&orders, "a", 7).unwrap().status(),
            Status::Up
        );
    }

    #[test]
    fn a_heartbeat_racing_a_status_change_still_renews() {
        let t = table();
        let orders = service("orders");
        let old = t.register(registration("orders", "a", 10), 0);
        t.set_status(&orders, "a", Status::Draining, 1).unwrap();
        // A renewal through the record read before the change lands on the new one too.
        old.clock.renew(8_000, old.lease_ms());
        assert_eq!(
            t.snapshot().instance(&orders, "a", 0).unwrap().expires_at(),
            18_000
        );
    }

    #[tokio::test]
    async fn every_change_wakes_index_watchers_and_streams() {
        let t = table();
        let mut index = t.watch_index();
        let mut events = t.subscribe();
        t.register(registration("orders", "a", 10), 0);
        index.changed().await.unwrap();
        assert_eq!(*index.borrow_and_update(), 1);
        assert_eq!(events.recv().await.unwrap().action, Action::Added);
        t.set_override(&service("orders"), "a", Some(Status::Down), 1)
            .unwrap();
        assert_eq!(events.recv().await.unwrap().cause, "override");
        t.expire(10_000);
        assert_eq!(events.recv().await.unwrap().cause, "expired");
        assert_eq!(*index.borrow(), 3);
    }

    #[test]
    fn mass_expiry_starts_self_preservation_which_keeps_and_renews() {
        let t = table();
        let orders = service("orders");
        for id in 0..10 {
            t.register(registration("orders", &id.to_string(), 10), 0);
        }
        // Six of ten stop renewing at once: well past a quarter, so preservation starts.
        for id in 6..10 {
            t.renew(&orders, &id.to_string(), 5_000).unwrap();
        }
        assert_eq!(t.expire(10_000), 0, "nothing evicted");
        let s = t.snapshot();
        let p = s.preservation.clone().expect("self-preservation active");
        assert_eq!((p.expired_in_window, p.instances, p.threshold), (6, 10, 3));
        assert!(p.reason().contains("6 of 10 leases"));
        assert!(s.instance(&orders, "0", 10_500).is_some(), "kept visible");
        // The registry's link came back: the kept instances renew.
        for id in 0..6 {
            t.renew(&orders, &id.to_string(), 11_000).unwrap();
        }
        assert_eq!(t.expire(11_100), 0);
        let s = t.snapshot();
        assert!(s.preservation.is_none(), "ends once renewals resume");
        assert_eq!(
            s.last_preservation_end.map(|e| e.1),
            Some("renewals resumed")
        );
    }

    #[test]
    fn self_preservation_ends_by_itself_at_its_time_limit() {
        let t = table();
        for id in 0..4 {
            t.register(registration("orders", &id.to_string(), 10), 0);
        }
        assert_eq!(t.expire(10_000), 0);
        assert!(t.snapshot().preservation.is_some());
        assert_eq!(t.expire(60_000), 0, "still within the limit");
        assert_eq!(t.expire(130_000), 4, "evicted once the limit passed");
        let s = t.snapshot();
        assert!(s.preservation.is_none());
        assert_eq!(
            s.last_preservation_end.map(|e| e.1),
            Some("time limit reached")
        );
    }

    fn upsert(instance: &Instance, at: u64) -> ReplicaAction {
        ReplicaAction::upsert(instance, "registered", at)
    }

    #[test]
    fn a_peer_record_is_applied_once_and_an_older_one_loses() {
        let origin = table();
        let peer = table();
        let orders = service("orders");
        let first = origin.register(registration("orders", "a", 10), 1_000);
        let second = origin
            .set_override(&orders, "a", Some(Status::OutOfService), 1_500)
            .unwrap();
        assert!(second.dirty > first.dirty, "every change has a newer stamp");
        // Out of order: the newer record first, then the older one.
        assert_eq!(
            peer.apply_replicated(&[upsert(&second, 1_500)], 2_000),
            [Outcome::Applied]
        );
        assert_eq!(
            peer.apply_replicated(&[upsert(&first, 1_000)], 2_000),
            [Outcome::Stale]
        );
        let s = peer.snapshot();
        let a = s.instance(&orders, "a", 2_000).unwrap();
        assert_eq!(a.status(), Status::OutOfService);
        assert_eq!(a.expires_at(), 11_000, "the origin's lease end, exactly");
        // The same record again changes nothing and tells no watcher.
        let index = s.index;
        peer.apply_replicated(&[upsert(&second, 1_500)], 2_100);
        assert_eq!(peer.snapshot().index, index);
    }

    #[test]
    fn a_deregistration_beats_an_older_record_that_arrives_after_it() {
        let origin = table();
        let peer = table();
        let orders = service("orders");
        let a = origin.register(registration("orders", "a", 10), 1_000);
        let delete = ReplicaAction::Delete {
            service: "orders".into(),
            instance_id: "a".into(),
            dirty: a.dirty + 1,
            at: 1_100,
        };
        assert_eq!(peer.apply_replicated(&[delete], 1_200), [Outcome::Applied]);
        assert_eq!(
            peer.apply_replicated(&[upsert(&a, 1_000)], 1_300),
            [Outcome::Stale],
            "the late registration does not resurrect it"
        );
        assert!(peer.snapshot().instance(&orders, "a", 1_300).is_none());
        // A registration made after the deregistration is a new one and wins.
        let again = origin.register(registration("orders", "a", 10), 2_000);
        assert_eq!(
            peer.apply_replicated(&[upsert(&again, 2_000)], 2_100),
            [Outcome::Applied]
        );
    }

    #[test]
    fn a_renewal_of_an_unknown_or_newer_record_asks_for_the_record() {
        let origin = table();
        let peer = table();
        let orders = service("orders");
        let a = origin.register(registration("orders", "a", 10), 1_000);
        let renew = |dirty: u64, expires_at: u64| ReplicaAction::Renew {
            service: "orders".into(),
            instance_id: "a".into(),
            dirty,
            expires_at,
            last_renewal: expires_at - 10_000,
            at: 0,
        };
        assert_eq!(
            peer.apply_replicated(&[renew(a.dirty, 15_000)], 5_000),
            [Outcome::Unknown]
        );
        peer.apply_replicated(&[upsert(&a, 1_000)], 5_000);
        assert_eq!(
            peer.apply_replicated(&[renew(a.dirty, 15_000)], 5_000),
            [Outcome::Applied]
        );
        // Renewals that arrive out of order never shorten the lease.
        peer.apply_replicated(&[renew(a.dirty, 13_000)], 5_100);
        let s = peer.snapshot();
        assert_eq!(s.instance(&orders, "a", 0).unwrap().expires_at(), 15_000);
        assert_eq!(
            peer.apply_replicated(&[renew(a.dirty + 5, 16_000)], 5_200),
            [Outcome::Outdated]
        );
    }

    #[test]
    fn client_writes_are_queued_for_peers_and_replicated_ones_are_not() {
        let fanout = Arc::new(Fanout::new(&crate::peers::PeerSettings {
            urls: "http://peer-b:8761".into(),
            ..Default::default()
        }));
        let t = LeaseTable::replicating(LeaseSettings::default(), Some(fanout.clone()));
        assert!(!t.is_ready(), "not ready before the start-up copy");
        let orders = service("orders");
        let a = t.register(registration("orders", "a", 10), 1_000);
        t.renew(&orders, "a", 2_000).unwrap();
        t.set_status(&orders, "a", Status::Draining, 3_000).unwrap();
        t.deregister(&orders, "a", 4_000).unwrap();
        let queued = |link: &crate::peers::PeerLink| link.view()["queued"].as_u64();
        assert_eq!(queued(&fanout.links()[0]), Some(4));
        // What a peer sends is applied, and never sent on.
        let other = table();
        let b = other.register(registration("orders", "b", 10), 1_000);
        t.apply_replicated(&[upsert(&b, 1_000)], 1_100);
        assert_eq!(queued(&fanout.links()[0]), Some(4));
        assert_eq!(a.registration.instance_id, "a");
    }

    #[test]
    fn few_expiries_never_start_self_preservation() {
        let t = table();
        for id in 0..10 {
            t.register(registration("orders", &id.to_string(), 10), 0);
        }
        for id in 2..10 {
            t.renew(&service("orders"), &id.to_string(), 5_000).unwrap();
        }
        assert_eq!(t.expire(10_000), 2);
        assert!(t.snapshot().preservation.is_none());
    }
}
