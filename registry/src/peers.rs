//! Peers: several registry nodes that replicate every client write to each other, so
//! losing one loses no instance, as Eureka's peers do (available first, not
//! consensus; `docs/registry.md` says what that gives).
//!
//! - Every write a client makes on this node (register, renew, deregister, status,
//!   override and its removal) is queued once per peer by the [`Fanout`], under the
//!   table's write lock, so each peer gets this node's writes in the order it applied
//!   them. What a node applies from a peer is never queued again: peers do not echo.
//! - One task per peer sends its queue in batches (`POST /api/v1/replication`), each
//!   numbered; a batch that fails is retried, with backoff, under the same number, and
//!   the receiver skips a number it already applied, so each write is applied at most
//!   once per peer. A peer that is down never blocks a client: its queue grows up to
//!   `peers.queue_limit`, past which it is dropped and the whole table is sent instead
//!   once the peer answers again.
//! - Conflicts resolve by the record's dirty stamp (Eureka's last dirty time): the
//!   newer record wins, a deregistration beats older records that arrive after it.
//!   A replicated renewal of a record the peer lacks, or holds older, is answered so,
//!   and this node sends its record.
//! - A node with peers copies the whole table from the first ready peer before it
//!   answers reads (`GET /api/v1/replication/table`); until then reads answer 503,
//!   which every registry client takes as "ask the next peer".
//! - Every response carries `X-Registry-Node`, the node's name (new at every start):
//!   a node finds itself in its peer list by it, and a client can tell whose index a
//!   blocking query's answer holds.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::Problem;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    leases::{Instance, LeaseTable, now_ms},
    model::{EurekaDetails, Registration, ServiceName, Status},
};

/// The header naming the node that answered.
pub const NODE_HEADER: &str = "x-registry-node";

/// The `peers` section of the registry's settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerSettings {
    /// The peers' base URLs, comma-separated (`REGISTRY_PEERS__URLS`). The list may
    /// name this node too, as Eureka's `defaultZone` does: it recognises itself and
    /// skips that entry, so every node can be given the same list.
    pub urls: String,
    /// The credential sent to peers; the operator's token (`auth.token`) when unset.
    /// Every peer must accept it as its operator token.
    pub token: Option<String>,
    /// CA certificates (PEM files) trusted for `https://` peers besides the system's.
    pub ca_files: Vec<PathBuf>,
    /// How long a starting node waits for a peer to copy the table from while some
    /// peer cannot be reached, before it starts with an empty table.
    pub sync_timeout_ms: u64,
    /// Writes sent to a peer per request.
    pub batch_size: usize,
    /// Writes queued for a peer that is down; past it the queue is dropped and the
    /// whole table is sent once the peer is back.
    pub queue_limit: usize,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            urls: String::new(),
            token: None,
            ca_files: Vec::new(),
            sync_timeout_ms: 3000,
            batch_size: 500,
            queue_limit: 100_000,
        }
    }
}

impl std::fmt::Debug for PeerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSettings")
            .field("urls", &self.urls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_files", &self.ca_files)
            .field("sync_timeout_ms", &self.sync_timeout_ms)
            .field("batch_size", &self.batch_size)
            .field("queue_limit", &self.queue_limit)
            .finish()
    }
}

impl PeerSettings {
    /// The configured URLs, trimmed, without trailing slashes.
    pub fn url_list(&self) -> Vec<String> {
        self.urls
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect()
    }
}

/// An instance's whole record, as peers exchange it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub service: String,
    pub instance_id: String,
    pub host: String,
    pub port: u16,
    /// What the instance reports.
    pub status: Status,
    pub override_status: Option<Status>,
    pub lease_seconds: u32,
    pub health_url: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub eureka: EurekaDetails,
    pub registered_at: u64,
    pub updated_at: u64,
    pub dirty: u64,
    pub expires_at: u64,
    pub last_renewal: u64,
}

impl Record {
    /// The registration it holds, checked as a client's would be.
    pub fn registration(&self, service: &ServiceName) -> Option<Registration> {
        let registration = Registration {
            service: service.clone(),
            instance_id: self.instance_id.clone(),
            host: self.host.clone(),
            port: self.port,
            status: self.status,
            lease_seconds: self.lease_seconds,
            health_url: self.health_url.clone(),
            metadata: self.metadata.clone(),
            eureka: self.eureka.clone(),
        };
        registration.validate().ok()?;
        Some(registration)
    }
}

/// One write, replicated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum ReplicaAction {
    /// A registration, status or override change: the record after it.
    #[serde(rename_all = "camelCase")]
    Upsert {
        record: Box<Record>,
        cause: String,
        /// When the origin applied it, epoch milliseconds.
        at: u64,
    },
    #[serde(rename_all = "camelCase")]
    Renew {
        service: String,
        instance_id: String,
        /// The version of the record renewed.
        dirty: u64,
        expires_at: u64,
        last_renewal: u64,
        at: u64,
    },
    /// A deregistration, stamped like a record.
    #[serde(rename_all = "camelCase")]
    Delete {
        service: String,
        instance_id: String,
        dirty: u64,
        at: u64,
    },
}

impl ReplicaAction {
    pub fn upsert(instance: &Instance, cause: &str, at: u64) -> Self {
        ReplicaAction::Upsert {
            record: Box::new(instance.record()),
            cause: cause.to_owned(),
            at,
        }
    }

    /// The instance it is about; `None` for a service name no client could use.
    pub fn key(&self) -> Option<(ServiceName, String)> {
        let (service, id) = match self {
            ReplicaAction::Upsert { record, .. } => (&record.service, &record.instance_id),
            ReplicaAction::Renew {
                service,
                instance_id,
                ..
            }
            | ReplicaAction::Delete {
                service,
                instance_id,
                ..
            } => (service, instance_id),
        };
        Some((ServiceName::parse(service).ok()?, id.clone()))
    }

    /// The stamp it carries.
    pub fn dirty(&self) -> Option<u64> {
        match self {
            ReplicaAction::Upsert { record, .. } => Some(record.dirty),
            ReplicaAction::Renew { dirty, .. } | ReplicaAction::Delete { dirty, .. } => {
                Some(*dirty)
            }
        }
    }

    fn at(&self) -> u64 {
        match self {
            ReplicaAction::Upsert { at, .. }
            | ReplicaAction::Renew { at, .. }
            | ReplicaAction::Delete { at, .. } => *at,
        }
    }
}

/// What a peer made of one replicated write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Applied,
    /// The peer holds a newer record, or a newer deregistration.
    Stale,
    /// A renewal of an instance the peer does not list: send the record.
    Unknown,
    /// A renewal of a newer record than the peer holds: send the record.
    Outdated,
    /// A record whose lease had already ended when it arrived.
    Expired,
    /// A record no client could have registered.
    Invalid,
}

/// The writes queued for one peer.
#[derive(Debug, Default)]
struct Queue {
    actions: VecDeque<ReplicaAction>,
    /// The queue outgrew its limit and was dropped: send the whole table next.
    overflowed: bool,
}

/// One peer, as this node sees it.
#[derive(Debug)]
pub struct PeerLink {
    pub url: String,
    queue: Mutex<Queue>,
    wake: Notify,
    /// The entry turned out to be this node itself.
    itself: AtomicBool,
    /// Whether the last request to it succeeded.
    up: AtomicBool,
    last_success_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
    sent: AtomicU64,
}

impl PeerLink {
    fn new(url: String) -> Self {
        Self {
            url,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            itself: AtomicBool::new(false),
            up: AtomicBool::new(false),
            last_success_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
            sent: AtomicU64::new(0),
        }
    }

    fn push(&self, action: ReplicaAction, limit: usize) {
        if self.itself.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.overflowed {
                // The whole table goes next; this write is in it.
                return;
            }
            queue.actions.push_back(action);
            if queue.actions.len() > limit {
                queue.actions.clear();
                queue.overflowed = true;
                tracing::warn!(peer = %self.url, limit, "replication queue full: the whole table will be sent once the peer answers");
            }
        }
        self.wake.notify_one();
    }

    fn queued(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .actions
            .len()
    }

    fn mark_itself(&self) {
        if !self.itself.swap(true, Ordering::Relaxed) {
            tracing::info!(peer = %self.url, "this peer entry is this node itself: skipped");
        }
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.actions.clear();
        queue.overflowed = false;
    }

    fn succeeded(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(peer = %self.url, "peer reachable");
        }
        self.last_success_ms.store(now_ms(), Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn failed(&self, error: String) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(peer = %self.url, %error, "peer unreachable; its writes are queued and retried");
        }
        metrics::counter!("registry_replication_failures_total", "peer" => self.url.clone())
            .increment(1);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    /// The peer as `/api/v1/state` and the dashboard show it.
    pub fn view(&self) -> Value {
        let last = self.last_success_ms.load(Ordering::Relaxed);
        json!({
            "url": self.url,
            "state": if self.itself.load(Ordering::Relaxed) {
                "self"
            } else if self.up.load(Ordering::Relaxed) {
                "up"
            } else {
                "down"
            },
            "queued": self.queued(),
            "sent": self.sent.load(Ordering::Relaxed),
            "lastSuccessAt": (last > 0).then_some(last),
            "lastError": self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

/// Queues each client write once for every peer.
#[derive(Debug)]
pub struct Fanout {
    links: Vec<Arc<PeerLink>>,
    limit: usize,
}

impl Fanout {
    pub fn new(settings: &PeerSettings) -> Self {
        Self {
            links: settings
                .url_list()
                .into_iter()
                .map(|url| Arc::new(PeerLink::new(url)))
                .collect(),
            limit: settings.queue_limit.max(1),
        }
    }

    pub fn push(&self, action: ReplicaAction) {
        for link in &self.links {
            link.push(action.clone(), self.limit);
        }
    }

    pub fn links(&self) -> &[Arc<PeerLink>] {
        &self.links
    }
}

/// The peers' HTTP side: the client that sends, and the state both directions share.
#[derive(Debug, Clone)]
pub struct Peers {
    fanout: Arc<Fanout>,
    http: reqwest::Client,
    token: Option<String>,
    settings: PeerSettings,
}

/// A batch, as `POST /api/v1/replication` takes it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Batch {
    /// The sending node.
    pub node: String,
    /// Which of the sender's peer entries sent it (two entries may name one peer).
    #[serde(default)]
    pub stream: u32,
    /// Numbers the sender's batches to this peer, from 1; a retry reuses its number.
    pub seq: u64,
    pub actions: Vec<ReplicaAction>,
}

/// The whole table, as `GET /api/v1/replication/table` gives it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Table {
    pub node: String,
    pub records: Vec<Record>,
    /// Remembered deregistrations: service, instance id, dirty stamp.
    pub tombstones: Vec<(String, String, u64)>,
}

impl Peers {
    /// The peers `settings` name, or `None` when it names none.
    pub fn new(
        settings: &PeerSettings,
        operator_token: Option<&str>,
    ) -> anyhow::Result<Option<Self>> {
        if settings.url_list().is_empty() {
            return Ok(None);
        }
        for url in settings.url_list() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                anyhow::bail!("peers.urls: `{url}` must be an http:// or https:// URL");
            }
        }
        let http = shared::tls::client_builder(&settings.ca_files)
            .map_err(|e| anyhow::anyhow!("peers.ca_files: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Some(Self {
            fanout: Arc::new(Fanout::new(settings)),
            http,
            token: settings
                .token
                .clone()
                .or_else(|| operator_token.map(str::to_owned))
                .filter(|t| !t.is_empty()),
            settings: settings.clone(),
        }))
    }

    pub fn fanout(&self) -> Arc<Fanout> {
        self.fanout.clone()
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Copies the table from the first ready peer, then marks `table` ready. When no
    /// peer is ready because every one that answers is starting too, this is a cold
    /// start of the whole group: start empty at once. While a peer cannot be reached
    /// at all, keep trying for `sync_timeout_ms`, then start empty.
    pub async fn sync(&self, table: &LeaseTable, shutdown: &CancellationToken) {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.sync_timeout_ms);
        loop {
            let mut unreachable = 0;
            for link in self.fanout.links() {
                if link.itself.load(Ordering::Relaxed) {
                    continue;
                }
                let answer = self
                    .request(
                        reqwest::Method::GET,
                        format!("{}/api/v1/replication/table", link.url),
                    )
                    .send()
                    .await;
                let response = match answer {
                    Ok(r) => r,
                    Err(e) => {
                        link.failed(shared::tls::error_chain(&e));
                        unreachable += 1;
                        continue;
                    }
                };
                let node = response
                    .headers()
                    .get(NODE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                if node.as_deref() == Some(table.node()) {
                    link.mark_itself();
                    continue;
                }
                if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                    // Starting too; it has nothing to give.
                    link.succeeded();
                    continue;
                }
                if !response.status().is_success() {
                    let status = response.status();
                    link.failed(format!("table: {status}"));
                    tracing::warn!(peer = %link.url, %status, "a peer refused the table (is peers.token its operator token?)");
                    unreachable += 1;
                    continue;
                }
                match response.json::<Table>().await {
                    Ok(copy) => {
                        link.succeeded();
                        let count = copy.records.len();
                        let now = now_ms();
                        let mut actions = as_writes(copy.records, copy.tombstones, now);
                        table.apply_replicated(actions.make_contiguous(), now);
                        tracing::info!(peer = %link.url, instances = count, "copied the table from a peer");
                        table.mark_ready();
                        return;
                    }
                    Err(e) => {
                        link.failed(format!("unreadable table: {e}"));
                        unreachable += 1;
                    }
                }
            }
            if unreachable == 0 {
                tracing::info!("no peer holds a table yet: starting empty");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    waited_ms = self.settings.sync_timeout_ms,
                    "no peer could be reached to copy the table from: starting empty"
                );
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = shutdown.cancelled() => break,
            }
        }
        table.mark_ready();
    }

    /// Runs one sender per peer until `shutdown`.
    pub fn spawn_senders(&self, table: Arc<LeaseTable>, shutdown: CancellationToken) {
        for (stream, link) in self.fanout.links().iter().enumerate() {
            tokio::spawn(send_to(
                self.clone(),
                stream as u32,
                link.clone(),
                table.clone(),
                shutdown.clone(),
            ));
        }
    }
}

/// How long a sender with nothing to send waits before it checks on its peer.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Sends `link`'s queue, batch by batch, until `shutdown`.
async fn send_to(
    peers: Peers,
    stream: u32,
    link: Arc<PeerLink>,
    table: Arc<LeaseTable>,
    shutdown: CancellationToken,
) {
    let batch_size = peers.settings.batch_size.max(1);
    let url = format!("{}/api/v1/replication", link.url);
    let mut seq = 0_u64;
    // An empty batch now and whenever the peer heard nothing for a while, so its state
    // here (and on the dashboard) is real, and a peer that came back is noticed.
    let mut probe = true;
    // The whole table, after the queue overflowed: sent before the queue, outside its
    // limit (it is as long as the table, no longer).
    let mut whole: VecDeque<ReplicaAction> = VecDeque::new();
    loop {
        let actions = loop {
            if link.itself.load(Ordering::Relaxed) {
                return;
            }
            let overflowed = {
                let mut queue = link.queue.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::take(&mut queue.overflowed)
            };
            if overflowed {
                // Read with no queue lock held: a client write holds the table's
                // lock while it queues, so the two locks are never taken the other
                // way round.
                whole = whole_table(&table);
            }
            let taken: Vec<ReplicaAction> = if whole.is_empty() {
                let mut queue = link.queue.lock().unwrap_or_else(|p| p.into_inner());
                let n = queue.actions.len().min(batch_size);
                queue.actions.drain(..n).collect()
            } else {
                let n = whole.len().min(batch_size);
                whole.drain(..n).collect()
            };
            if !taken.is_empty() || probe {
                probe = false;
                break taken;
            }
            tokio::select! {
                () = link.wake.notified() => {}
                () = tokio::time::sleep(PROBE_INTERVAL) => probe = true,
                () = shutdown.cancelled() => return,
            }
        };
        seq += 1;
        let batch = Batch {
            node: table.node().to_owned(),
            stream,
            seq,
            actions,
        };
        let mut backoff = Duration::from_millis(50);
        let answer = loop {
            match send_batch(&peers, &url, &batch).await {
                Ok(answer) if answer.node.as_deref() == Some(table.node()) => {
                    link.mark_itself();
                    return;
                }
                Ok(answer) => break Some(answer),
                Err(Failure::Refused(error)) => {
                    // The peer will never take this batch (it is not a matter of
                    // time): drop it, and send the whole table instead, so nothing
                    // it held is lost for good.
                    tracing::error!(peer = %link.url, %error, writes = batch.actions.len(), "a peer refused a replication batch; sending it the whole table instead");
                    link.failed(error);
                    link.queue
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .overflowed = true;
                    break None;
                }
                Err(Failure::Retry(error)) => link.failed(error),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        };
        let Some(answer) = answer else {
            continue;
        };
        link.succeeded();
        link.sent
            .fetch_add(batch.actions.len() as u64, Ordering::Relaxed);
        metrics::counter!("registry_replication_sent_total", "peer" => link.url.clone())
            .increment(batch.actions.len() as u64);
        // What the peer holds that beat ours: take it, so both hold the winner.
        if !answer.newer.is_empty() {
            table.apply_replicated(&answer.newer, now_ms());
        }
        // Renewals of records the peer lacks or holds older: send it ours.
        let now = now_ms();
        let snapshot = table.snapshot();
        for (action, outcome) in batch.actions.iter().zip(answer.outcomes) {
            if matches!(outcome, Outcome::Unknown | Outcome::Outdated)
                && let Some((service, id)) = action.key()
                && let Some(current) = snapshot.instance(&service, &id, now)
            {
                link.push(
                    ReplicaAction::upsert(current, "registered", now),
                    peers.fanout.limit,
                );
            }
        }
    }
}

/// This node's whole table as writes.
fn whole_table(table: &LeaseTable) -> VecDeque<ReplicaAction> {
    let now = now_ms();
    let (records, tombstones) = table.export(now);
    as_writes(records, tombstones, now)
}

/// A table's records and deletions as the writes that make a peer's table the same:
/// deletions first, so a record they beat is refused.
fn as_writes(
    records: Vec<Record>,
    tombstones: Vec<(String, String, u64)>,
    now: u64,
) -> VecDeque<ReplicaAction> {
    tombstones
        .into_iter()
        .map(|(service, instance_id, dirty)| ReplicaAction::Delete {
            service,
            instance_id,
            dirty,
            at: now,
        })
        .chain(records.into_iter().map(|record| ReplicaAction::Upsert {
            record: Box::new(record),
            cause: "registered".into(),
            at: now,
        }))
        .collect()
}

/// A peer's answer to a batch.
#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(skip)]
    node: Option<String>,
    outcomes: Vec<Outcome>,
    #[serde(default)]
    newer: Vec<ReplicaAction>,
}

/// Why a batch did not go through.
enum Failure {
    /// Unreachable, starting, overloaded, or refusing our credential: a matter of
    /// time (or of the operator fixing `peers.token`).
    Retry(String),
    /// The batch itself is refused: sending it again changes nothing.
    Refused(String),
}

/// Sends one batch.
async fn send_batch(peers: &Peers, url: &str, batch: &Batch) -> Result<Answer, Failure> {
    let response = peers
        .request(reqwest::Method::POST, url.to_owned())
        .json(batch)
        .send()
        .await
        .map_err(|e| Failure::Retry(shared::tls::error_chain(&e)))?;
    let node = response
        .headers()
        .get(NODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let status = response.status();
    if status.is_client_error()
        && !matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
        )
    {
        return Err(Failure::Refused(format!("{status}")));
    }
    if !status.is_success() {
        return Err(Failure::Retry(format!("{status}")));
    }
    let mut answer: Answer = response
        .json()
        .await
        .map_err(|e| Failure::Retry(format!("unreadable answer: {e}")))?;
    if answer.outcomes.len() != batch.actions.len() {
        return Err(Failure::Refused(
            "the peer answered for a different number of writes".into(),
        ));
    }
    answer.node = node;
    Ok(answer)
}

/// The receiving side's state: the last batch number applied per sending node.
#[derive(Debug, Default)]
pub struct Received {
    last: Mutex<HashMap<String, u64>>,
}

#[derive(Clone)]
struct ReplicationState {
    table: Arc<LeaseTable>,
    received: Arc<Received>,
}

/// `POST /api/v1/replication` and `GET /api/v1/replication/table`.
pub fn router(table: Arc<LeaseTable>) -> Router {
    Router::new()
        .route("/api/v1/replication", axum::routing::post(receive))
        .route("/api/v1/replication/table", get(export))
        .with_state(ReplicationState {
            table,
            received: Arc::new(Received::default()),
        })
        // A batch of records with the most metadata a client may register is far
        // above a client request's limit.
        .layer(axum::extract::DefaultBodyLimit::max(REPLICATION_BODY_LIMIT))
}

/// The largest replication request taken: `batch_size` (500) records of the largest
/// size a registration may have.
const REPLICATION_BODY_LIMIT: usize = 64 * 1024 * 1024;

async fn receive(
    State(state): State<ReplicationState>,
    shared::http::Json(batch): shared::http::Json<Batch>,
) -> Response {
    let duplicate = {
        let mut last = state
            .received
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let seen = last
            .entry(format!("{}/{}", batch.node, batch.stream))
            .or_insert(0);
        if batch.seq <= *seen {
            true
        } else {
            *seen = batch.seq;
            false
        }
    };
    if duplicate {
        // Applied before; its answer was lost on the way back.
        metrics::counter!("registry_replication_duplicates_total").increment(1);
        let outcomes = vec![Outcome::Applied; batch.actions.len()];
        return Json(json!({ "duplicate": true, "outcomes": outcomes })).into_response();
    }
    if batch.actions.is_empty() {
        return Json(json!({ "duplicate": false, "outcomes": [] })).into_response();
    }
    let now = now_ms();
    for action in &batch.actions {
        metrics::histogram!("registry_replication_delay_seconds")
            .record(now.saturating_sub(action.at()) as f64 / 1000.0);
    }
    let (outcomes, newer) = state.table.apply_from_peer(&batch.actions, now);
    for outcome in &outcomes {
        let label = match outcome {
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::Unknown => "unknown",
            Outcome::Outdated => "outdated",
            Outcome::Expired => "expired",
            Outcome::Invalid => "invalid",
        };
        metrics::counter!("registry_replication_received_total", "outcome" => label).increment(1);
    }
    Json(json!({ "duplicate": false, "outcomes": outcomes, "newer": newer })).into_response()
}

async fn export(State(state): State<ReplicationState>) -> Response {
    if !state.table.is_ready() {
        return syncing();
    }
    let (records, tombstones) = state.table.export(now_ms());
    Json(Table {
        node: state.table.node().to_owned(),
        records,
        tombstones,
    })
    .into_response()
}

fn syncing() -> Response {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "This registry node is starting and copying the table from its peers; ask another \
         peer, or again in a moment.",
    )
    .retry_after(1)
}

/// Answers 503 to reads and client writes until the table is ready.
pub async fn require_ready(
    State(table): State<Arc<LeaseTable>>,
    request: Request,
    next: Next,
) -> Response {
    // The state says "starting" itself, with the peers it tries.
    if table.is_ready() || request.uri().path() == "/api/v1/state" {
        next.run(request).await
    } else {
        syncing()
    }
}

/// Names the node in every response.
pub async fn name_node(
    State(table): State<Arc<LeaseTable>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(table.node()) {
        response.headers_mut().insert(NODE_HEADER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_travel_as_tagged_json() {
        let action = ReplicaAction::Delete {
            service: "orders".into(),
            instance_id: "a".into(),
            dirty: 7,
            at: 1,
        };
        let text = serde_json::to_string(&action).unwrap();
        assert!(text.contains(r#""op":"delete""#), "{text}");
        assert!(text.contains(r#""instanceId":"a""#), "{text}");
        assert_eq!(
            serde_json::from_str::<ReplicaAction>(&text).unwrap(),
            action
        );
    }

    #[test]
    fn a_full_queue_is_dropped_for_the_whole_table() {
        let link = PeerLink::new("http://peer".into());
        for i in 0..3 {
            link.push(
                ReplicaAction::Delete {
                    service: "orders".into(),
                    instance_id: i.to_string(),
                    dirty: i,
                    at: 0,
                },
                2,
            );
        }
        let queue = link.queue.lock().unwrap();
        assert!(queue.overflowed && queue.actions.is_empty());
    }

    #[test]
    fn the_peer_list_is_trimmed_and_may_be_empty() {
        let settings = PeerSettings {
            urls: " http://a:1/ ,,http://b:2".into(),
            ..PeerSettings::default()
        };
        assert_eq!(settings.url_list(), ["http://a:1", "http://b:2"]);
        assert!(
            Peers::new(&PeerSettings::default(), None)
                .unwrap()
                .is_none()
        );
        let bad = PeerSettings {
            urls: "peer-b:8761".into(),
            ..PeerSettings::default()
        };
        assert!(
            Peers::new(&bad, None)
                .unwrap_err()
                .to_string()
                .contains("peers.urls")
        );
    }
}
