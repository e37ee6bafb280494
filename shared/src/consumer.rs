//! The event consumer every service runs: Kafka in, one PostgreSQL transaction per
//! batch, offsets committed only after that transaction committed.
//!
//! A round takes what the broker has ready (up to `max_batch` messages), parses each,
//! and applies the parsed events in order inside one transaction. Then it commits the
//! transaction, sends the events nobody can process to `<topic>.DLT` and waits for
//! the broker's acknowledgement, and only then stores and commits the offsets. A crash
//! at any point redelivers the round; handlers are idempotent on `eventId`, so the
//! redelivery changes nothing that was already applied.
//!
//! Failures come in two kinds:
//! - **transient** (the database is unreachable, a deadlock, a serialization
//!   failure): the whole round is retried with a doubling backoff, for as long as it
//!   takes. Nothing is skipped and no offset moves.
//! - **permanent** (the payload is not an event, or the handler says a retry will not
//!   fix it, or the database refuses the data itself): the round is rolled back and
//!   replayed one event per transaction, so exactly the bad events are isolated. Each
//!   goes to the dead-letter topic with the error in its headers, named and encoded
//!   as Spring Kafka's `DeadLetterPublishingRecoverer` writes them (so a Spring
//!   consumer of the DLT reads them as its own), and the partition moves on.
//!
//! Rebalances: a member commits only partitions it owns. When partitions are revoked
//! it commits what it applied from them (synchronously, before the new owner starts)
//! and forgets them; a round that was received before an assignment change records
//! no offsets at all (its events are redelivered to the partition's owner, which
//! skips them as already applied). A member has one commit in flight at most, and
//! waits for its answer before it reads on: librdkafka retries a commit the
//! coordinator could not take yet, and an asynchronous one retried after a later one
//! would land last. So no committed offset ever moves backwards, even when a member
//! stops right after losing partitions to another, or the group's coordinator dies.
//!
//! Consumer lag comes from librdkafka's statistics and is exported as the gauge
//! `kafka_consumer_lag{group,topic,partition}`.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures::FutureExt;
use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer},
    message::{Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    statistics::Statistics,
};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::kafka::KafkaSettings;

/// The `consumer` section of a service that consumes events.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerLoopSettings {
    /// Run the consumer in this process.
    pub enabled: bool,
    /// The consumer group; empty means the service's canonical name.
    pub group: String,
    /// Most events applied in one transaction.
    pub max_batch: usize,
    /// The longest wait between retries of a round that failed transiently.
    pub max_backoff_ms: u64,
    /// How often librdkafka reports statistics (consumer lag); 0 turns them off.
    pub statistics_interval_ms: u64,
    /// Applied offsets are committed at most this often (and always at shutdown).
    pub commit_interval_ms: u64,
    /// How long an applied `eventId` is remembered (its row in `processed_events`);
    /// 0 keeps them forever. The default matches the topics' seven-day retention: an
    /// event older than that can no longer be redelivered from the topic.
    pub dedup_retention_hours: u64,
}

impl Default for ConsumerLoopSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            group: String::new(),
            max_batch: 200,
            max_backoff_ms: 10_000,
            statistics_interval_ms: 5_000,
            commit_interval_ms: 200,
            dedup_retention_hours: 168,
        }
    }
}

/// The span an event is applied in: a consumer span, the child of the producer span
/// whose context the record's `traceparent` header carries, so the event's work (and
/// its log lines) join the trace of the request that caused it. Events the handler
/// writes in turn carry this span's context on, and the `x-request-id` of the request
/// that started the saga.
fn event_span(message: &Incoming) -> tracing::Span {
    let span = tracing::info_span!(
        "event",
        otel.name = %format_args!("{} process", message.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.destination.name = %message.topic,
        messaging.destination.partition.id = message.partition,
        messaging.kafka.offset = message.offset,
        topic = %message.topic,
        partition = message.partition,
        offset = message.offset,
        trace_id = tracing::field::Empty,
        request_id = message
            .header(crate::events::REQUEST_ID_HEADER)
            .and_then(crate::telemetry::request_id)
            .unwrap_or_default(),
    );
    crate::telemetry::continue_trace(&span, message.header(crate::events::TRACEPARENT_HEADER));
    span
}

/// One message as it came off the topic.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
}

impl Incoming {
    /// A header's value as text, if present and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Retrying later may succeed: the round is retried, nothing is skipped.
    #[error("{0}")]
    Transient(String),
    /// No retry will fix it: the event is dead-lettered.
    #[error("{0}")]
    Permanent(String),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) {
            Failure::Transient(format!("database: {e}"))
        } else {
            Failure::Permanent(format!("database refused the event: {e}"))
        }
    }
}

/// Whether a database error may go away by itself: the connection, the server's
/// state, or a conflict with a concurrent transaction.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_none_or(|code| transient_sqlstate(&code)),
        _ => false,
    }
}

/// Whether a database error with SQLSTATE `code` may go away by itself. Some classes
/// say that the event's data was refused, which no retry changes: 22 (data
/// exception: a value out of range, text that is not a number...), 23 (integrity
/// constraint violation), 21 (cardinality violation), 54 (a program limit: a value
/// too large for its index) and P0 (raised by a trigger). Every other class is the
/// database's state: the connection
/// (08), a conflict with another transaction (40001, 40P01), a standby still read-only
/// after a failover (25006), a table or privilege missing after a migration went
/// wrong (42P01, 42501), resources (53), shutdown (57), an internal error (XX000). An
/// operator fixes those, and the round is retried until then, rather than every event
/// meanwhile dead-lettered and waiting for someone to replay it.
fn transient_sqlstate(code: &str) -> bool {
    !(code.starts_with("22")
        || code.starts_with("23")
        || code.starts_with("21")
        || code.starts_with("54")
        || code.starts_with("P0"))
}

/// What a service does with its events.
pub trait Handler: Send + Sync + 'static {
    type Event: Send + Sync;

    /// Turns a message into an event, or says why it is not one (dead-lettered).
    fn parse(&self, message: &Incoming) -> Result<Self::Event, String>;

    /// Applies one event inside the round's transaction; returns an outcome label for
    /// the metrics (counted once the transaction committed). Must be idempotent on the
    /// event's id: a redelivered event is applied again.
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a Self::Event,
        message: &'a Incoming,
    ) -> impl Future<Output = Result<&'static str, Failure>> + Send + 'a;
}

/// A partition: topic and partition number.
type Partition = (String, i32);

/// What this member owns, and the offsets it applied there. The rebalance callbacks
/// (run inside the consumer's polls) and the consuming loop share it.
#[derive(Debug, Default)]
struct Ownership {
    /// Bumped at every assignment change. A round received under an older epoch
    /// records no offsets.
    epoch: u64,
    assigned: BTreeSet<Partition>,
    /// Applied and not yet sent to the broker: the next offset to read, per partition.
    pending: BTreeMap<Partition, i64>,
    /// Committed (or tried): sent once more when the partition is revoked or the
    /// member stops, in case that commit failed.
    sent: BTreeMap<Partition, i64>,
}

impl Ownership {
    /// Records that a round applied events up to `next` (exclusive) in each
    /// partition, if the round was received under the current `epoch`; partitions
    /// this member no longer owns are skipped.
    fn applied(&mut self, epoch: u64, next: BTreeMap<Partition, i64>) {
        if epoch != self.epoch {
            return;
        }
        for (partition, offset) in next {
            if self.assigned.contains(&partition) {
                let entry = self.pending.entry(partition).or_insert(offset);
                *entry = (*entry).max(offset);
            }
        }
    }

    /// The pending offsets, now counted as sent.
    fn take_pending(&mut self) -> BTreeMap<Partition, i64> {
        let pending = std::mem::take(&mut self.pending);
        for (partition, offset) in &pending {
            self.sent.insert(partition.clone(), *offset);
        }
        pending
    }

    /// Offsets whose commit failed, pending again where nothing newer is, in the
    /// partitions still owned.
    fn retry(&mut self, failed: BTreeMap<Partition, i64>) {
        for (partition, offset) in failed {
            if self.assigned.contains(&partition) {
                let entry = self.pending.entry(partition).or_insert(offset);
                *entry = (*entry).max(offset);
            }
        }
    }

    /// Everything applied in `partitions` (sent or not), forgetting those partitions.
    fn release<'a>(
        &mut self,
        partitions: impl IntoIterator<Item = &'a Partition>,
    ) -> BTreeMap<Partition, i64> {
        let mut last = BTreeMap::new();
        for partition in partitions {
            self.assigned.remove(partition);
            let offsets = [self.sent.remove(partition), self.pending.remove(partition)];
            if let Some(offset) = offsets.into_iter().flatten().max() {
                last.insert(partition.clone(), offset);
            }
        }
        last
    }
}

/// Lag reporting from librdkafka's statistics, and the rebalance bookkeeping.
struct MemberContext {
    group: String,
    ownership: Arc<Mutex<Ownership>>,
}

impl MemberContext {
    fn ownership(&self) -> MutexGuard<'_, Ownership> {
        lock(&self.ownership)
    }
}

/// The lock, even if a panic poisoned it: the bookkeeping stays consistent because
/// every change to it is a single step.
fn lock(ownership: &Mutex<Ownership>) -> MutexGuard<'_, Ownership> {
    ownership
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn partitions(list: &TopicPartitionList) -> Vec<Partition> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

fn describe(partitions: &[Partition]) -> String {
    partitions
        .iter()
        .map(|(t, p)| format!("{t}/{p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `offsets` as a list to commit.
fn offset_list(offsets: &BTreeMap<Partition, i64>) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        if let Err(e) = list.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::warn!(error = %e, "cannot record an offset to commit");
        }
    }
    list
}

impl ClientContext for MemberContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(
                    "kafka_consumer_lag",
                    "group" => self.group.clone(),
                    "topic" => topic.clone(),
                    "partition" => partition.to_string()
                )
                .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        let rdkafka::consumer::Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let revoked = partitions(list);
        // Commit what was applied before the partitions go, so their next owner
        // starts right after it; then forget them, so nothing of theirs is committed
        // by this member again.
        let last = {
            let mut ownership = self.ownership();
            ownership.epoch += 1;
            ownership.release(&revoked)
        };
        tracing::info!(group = %self.group, partitions = %describe(&revoked), "partitions revoked");
        if !last.is_empty()
            && let Err(e) = consumer.commit(&offset_list(&last), CommitMode::Sync)
        {
            // The group already moved on (this member was declared dead): the new
            // owner resumes from the last commit that did land, and skips what it
            // redelivers as already applied.
            tracing::warn!(group = %self.group, error = %e, "cannot commit the revoked partitions' offsets");
        }
    }

    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        match rebalance {
            rdkafka::consumer::Rebalance::Assign(list) => {
                let assigned = partitions(list);
                {
                    let mut ownership = self.ownership();
                    ownership.epoch += 1;
                    ownership.assigned.extend(assigned.iter().cloned());
                }
                tracing::info!(group = %self.group, partitions = %describe(&assigned), "partitions assigned");
            }
            rdkafka::consumer::Rebalance::Revoke(_) => {}
            rdkafka::consumer::Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "rebalance failed");
            }
        }
    }
}

/// One consumer group member, reading one topic.
pub struct EventConsumer<H: Handler> {
    /// Shared with the blocking task that commits (see [`Self::commit_pending`]).
    consumer: Arc<StreamConsumer<MemberContext>>,
    ownership: Arc<Mutex<Ownership>>,
    producer: FutureProducer,
    pool: PgPool,
    handler: Arc<H>,
    topic: String,
    group: String,
    settings: ConsumerLoopSettings,
    delivery_timeout: Duration,
}

impl<H: Handler> std::fmt::Debug for EventConsumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventConsumer")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// The result of parsing one message of a round.
struct Parsed<E> {
    message: Incoming,
    event: Result<E, String>,
}

impl<H: Handler> EventConsumer<H> {
    /// Subscribes `group` (the settings' group, else `default_group`) to `topic`.
    pub fn new(
        kafka: &KafkaSettings,
        settings: ConsumerLoopSettings,
        default_group: &str,
        topic: &str,
        pool: PgPool,
        handler: H,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let group = if settings.group.is_empty() {
            default_group.to_owned()
        } else {
            settings.group.clone()
        };
        let mut config = kafka.consumer_config(&group);
        if settings.statistics_interval_ms > 0 {
            config.set(
                "statistics.interval.ms",
                settings.statistics_interval_ms.to_string(),
            );
        }
        let ownership = Arc::new(Mutex::new(Ownership::default()));
        let consumer: StreamConsumer<MemberContext> =
            config.create_with_context(MemberContext {
                group: group.clone(),
                ownership: ownership.clone(),
            })?;
        consumer.subscribe(&[topic])?;
        Ok(Self {
            consumer: Arc::new(consumer),
            ownership,
            producer: kafka.producer_config().create()?,
            pool,
            handler: Arc::new(handler),
            topic: topic.to_owned(),
            group,
            settings,
            delivery_timeout: Duration::from_millis(kafka.producer.delivery_timeout_ms),
        })
    }

    /// Consumes until `shutdown`: the round in flight finishes and its offsets are
    /// committed before this returns. Hourly, it forgets applied `eventId`s older than
    /// `dedup_retention_hours`.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.settings.dedup_retention_hours > 0 {
            let (pool, stop) = (self.pool.clone(), shutdown.clone());
            let keep = Duration::from_secs(self.settings.dedup_retention_hours * 3600);
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(3600));
                loop {
                    tokio::select! {
                        _ = every.tick() => {}
                        () = stop.cancelled() => return,
                    }
                    match forget_processed(&pool, keep).await {
                        Ok(n) if n > 0 => tracing::info!(forgotten = n, "old eventIds forgotten"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot forget old eventIds"),
                    }
                }
            });
        }
        tracing::info!(topic = %self.topic, group = %self.group, "consuming");
        // Applied offsets are committed at most every `commit_interval_ms`, so a busy
        // consumer does not send the broker a commit per round. A crash in between only
        // redelivers events whose effects are already in (and skipped by) the database.
        let interval = Duration::from_millis(self.settings.commit_interval_ms);
        let mut last_commit = tokio::time::Instant::now();
        // Set when shutdown came while a commit still waited for the broker.
        let mut commit_unfinished = false;
        loop {
            let has_pending = !lock(&self.ownership).pending.is_empty();
            let commit_due = async {
                if !has_pending {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep_until(last_commit + interval).await;
            };
            let first = tokio::select! {
                received = self.consumer.recv() => received,
                () = commit_due => {
                    if !self.commit_pending(&shutdown).await {
                        commit_unfinished = true;
                        break;
                    }
                    last_commit = tokio::time::Instant::now();
                    continue;
                }
                () = shutdown.cancelled() => break,
            };
            let first = match first {
                Ok(m) => incoming(&m),
                Err(e) => {
                    tracing::warn!(error = %e, topic = %self.topic, "cannot receive from the broker");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            };
            // Rebalance callbacks run only inside `recv`, on this task: an epoch read
            // now that is unchanged after the round was collected and applied means
            // every message of the round came from partitions this member still owns.
            let epoch = lock(&self.ownership).epoch;
            let mut round = vec![first];
            // Whatever else is already here joins the round, without waiting.
            while round.len() < self.settings.max_batch.max(1) {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => round.push(incoming(&m)),
                    _ => break,
                }
            }
            match self.process(round, &shutdown).await {
                Some(done) => {
                    lock(&self.ownership).applied(epoch, done);
                    if last_commit.elapsed() >= interval {
                        if !self.commit_pending(&shutdown).await {
                            commit_unfinished = true;
                            break;
                        }
                        last_commit = tokio::time::Instant::now();
                    }
                }
                None => break,
            }
        }
        // Everything applied in the partitions still owned, in case the last commit
        // failed; unless a commit still waits for the broker (its group coordinator
        // is away), which could land after this one: the rounds since the last commit
        // that landed are then redelivered, and skipped as already applied.
        let last = {
            let mut ownership = lock(&self.ownership);
            let owned: Vec<Partition> = ownership.assigned.iter().cloned().collect();
            ownership.release(&owned)
        };
        if commit_unfinished {
            tracing::warn!(group = %self.group, "stopping while an offset commit waits for the broker; the last rounds may be redelivered");
        } else if !last.is_empty()
            && let Err(e) = self.consumer.commit(&offset_list(&last), CommitMode::Sync)
        {
            tracing::warn!(error = %e, "offset commit at shutdown failed; the last round may be redelivered");
        }
        // Leave the group now, so its partitions move to the others at once rather
        // than when the session times out.
        self.consumer.unsubscribe();
        tracing::info!(topic = %self.topic, group = %self.group, "consumer stopped");
    }

    /// Applies and dead-letters one round; returns the positions to commit, or `None`
    /// if shutdown interrupted a retry (the round stays uncommitted and is redelivered).
    async fn process(
        &self,
        round: Vec<Incoming>,
        shutdown: &CancellationToken,
    ) -> Option<BTreeMap<(String, i32), i64>> {
        let parsed: Vec<Parsed<H::Event>> = round
            .into_iter()
            .map(|message| Parsed {
                event: match message.payload.as_deref() {
                    None => Err("the message has no payload".to_owned()),
                    Some(_) => self.handler.parse(&message),
                },
                message,
            })
            .collect();
        let max_backoff = Duration::from_millis(self.settings.max_backoff_ms);
        let mut backoff = Duration::from_millis(100);
        let (outcomes, dead) = loop {
            let attempt = match self.apply_together(&parsed).await {
                Err(Failure::Permanent(e)) => {
                    tracing::debug!(error = %e, "a round failed; applying its events one by one");
                    self.apply_one_by_one(&parsed).await
                }
                other => other,
            };
            match attempt {
                Ok(done) => break done,
                Err(e) => {
                    metrics::counter!("consumer_retries_total", "group" => self.group.clone())
                        .increment(1);
                    tracing::warn!(error = %e, retry_in = ?backoff, topic = %self.topic,
                        "cannot apply events; retrying, nothing is skipped");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return None,
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        };
        // Dead letters must be on the broker before the offsets move past them.
        let mut backoff = Duration::from_millis(100);
        while let Err(e) = self.dead_letter(&dead).await {
            tracing::warn!(error = %e, retry_in = ?backoff, "cannot publish dead letters; retrying");
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => return None,
            }
            backoff = (backoff * 2).min(max_backoff);
        }
        for outcome in outcomes {
            metrics::counter!("consumer_events_total",
                "group" => self.group.clone(), "outcome" => outcome)
            .increment(1);
        }
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for p in &parsed {
            let entry = next
                .entry((p.message.topic.clone(), p.message.partition))
                .or_insert(0);
            *entry = (*entry).max(p.message.offset + 1);
        }
        Some(next)
    }

    /// All events in one transaction. `Ok` holds the outcomes and the unparsable.
    async fn apply_together(
        &self,
        parsed: &[Parsed<H::Event>],
    ) -> Result<(Vec<&'static str>, Vec<DeadLetter>), Failure> {
        let mut tx = self.pool.begin().await?;
        let mut outcomes = Vec::with_capacity(parsed.len());
        let mut dead = Vec::new();
        for p in parsed {
            match &p.event {
                Ok(event) => outcomes.push(
                    self.handler
                        .apply(&mut tx, event, &p.message)
                        .instrument(event_span(&p.message))
                        .await?,
                ),
                Err(e) => dead.push(DeadLetter::unreadable(&p.message, e)),
            }
        }
        tx.commit().await?;
        Ok((outcomes, dead))
    }

    /// Each event in its own transaction, to isolate the ones that fail permanently.
    async fn apply_one_by_one(
        &self,
        parsed: &[Parsed<H::Event>],
    ) -> Result<(Vec<&'static str>, Vec<DeadLetter>), Failure> {
        let mut outcomes = Vec::with_capacity(parsed.len());
        let mut dead = Vec::new();
        for p in parsed {
            let event = match &p.event {
                Ok(event) => event,
                Err(e) => {
                    dead.push(DeadLetter::unreadable(&p.message, e));
                    continue;
                }
            };
            let mut tx = self.pool.begin().await?;
            let applied = self
                .handler
                .apply(&mut tx, event, &p.message)
                .instrument(event_span(&p.message))
                .await;
            match applied {
                Ok(outcome) => {
                    tx.commit().await?;
                    outcomes.push(outcome);
                }
                Err(Failure::Permanent(e)) => {
                    tx.rollback().await?;
                    dead.push(DeadLetter {
                        message: p.message.clone(),
                        class: REJECTED_EVENT,
                        error: e,
                    });
                }
                Err(transient) => return Err(transient),
            }
        }
        Ok((outcomes, dead))
    }

    /// Publishes `dead` to the dead-letter topic and waits for every acknowledgement.
    async fn dead_letter(&self, dead: &[DeadLetter]) -> Result<(), String> {
        let dlt = crate::events::dead_letter_topic(&self.topic);
        let sends = dead.iter().map(
            |DeadLetter {
                 message,
                 class,
                 error,
             }| {
                tracing::warn!(topic = %message.topic, partition = message.partition,
                offset = message.offset, error = %error, "dead-lettering an event");
                let mut headers = OwnedHeaders::new();
                for (name, value) in &message.headers {
                    headers = headers.insert(Header {
                        key: name,
                        value: Some(value),
                    });
                }
                for (key, value) in spring_dlt_headers(message, class, error, &self.group) {
                    headers = headers.insert(Header {
                        key,
                        value: Some(&value),
                    });
                }
                let producer = self.producer.clone();
                let dlt = dlt.clone();
                let timeout = self.delivery_timeout;
                async move {
                    let mut record: FutureRecord<'_, [u8], [u8]> =
                        FutureRecord::to(&dlt).headers(headers);
                    if let Some(key) = &message.key {
                        record = record.key(key.as_slice());
                    }
                    if let Some(payload) = &message.payload {
                        record = record.payload(payload.as_slice());
                    }
                    producer
                        .send(record, timeout)
                        .await
                        .map(|_| ())
                        .map_err(|(e, _)| e.to_string())
                }
            },
        );
        for result in futures::future::join_all(sends).await {
            result?;
        }
        if !dead.is_empty() {
            metrics::counter!("consumer_dead_lettered_total",
                "group" => self.group.clone(), "topic" => self.topic.clone())
            .increment(dead.len() as u64);
        }
        Ok(())
    }

    /// Commits the pending offsets, and waits for the broker's answer before the loop
    /// goes on. One commit at a time, never two in flight: librdkafka retries a
    /// commit the coordinator could not take yet (it was loading the group after a
    /// broker died, or the group was rebalancing), so an asynchronous commit could
    /// land after a later one and move the offset backwards. And no rebalance
    /// callback (which commits a revoked partition's offsets) runs meanwhile, since
    /// those run only inside `recv`. One that fails is merged back into the pending
    /// offsets, and sent again with the next.
    ///
    /// While the group's coordinator is away a commit may wait for as long as a
    /// session lasts; `shutdown` does not wait for it. Returns false when shutdown
    /// came first (the commit is still on its way).
    async fn commit_pending(&self, shutdown: &CancellationToken) -> bool {
        let pending = lock(&self.ownership).take_pending();
        if pending.is_empty() {
            return true;
        }
        let consumer = self.consumer.clone();
        let list = offset_list(&pending);
        let mut commit =
            tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync));
        let committed = tokio::select! {
            biased;
            committed = &mut commit => committed,
            () = shutdown.cancelled() => return false,
        };
        let error = match committed {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(group = %self.group, %error, "offset commit failed; sent again with the next");
        lock(&self.ownership).retry(pending);
        true
    }
}

/// The class names a dead letter's `kafka_dlt-exception-fqcn` gives. Rust has no
/// classes; these name the failure as this module classifies it: the message never
/// became an event, or the handler (or the database) refused the event.
const UNREADABLE_EVENT: &str = "shared.consumer.UnreadableEvent";
const REJECTED_EVENT: &str = "shared.consumer.RejectedEvent";

/// An event on its way to the dead-letter topic, with why.
#[derive(Debug)]
struct DeadLetter {
    message: Incoming,
    class: &'static str,
    error: String,
}

impl DeadLetter {
    fn unreadable(message: &Incoming, error: &str) -> Self {
        Self {
            message: message.clone(),
            class: UNREADABLE_EVENT,
            error: error.to_owned(),
        }
    }
}

/// The headers Spring Kafka's `DeadLetterPublishingRecoverer` adds, with its encodings:
/// the original partition a 4-byte big-endian int, the offset and timestamp 8-byte
/// big-endian longs, everything else UTF-8 text.
fn spring_dlt_headers(
    message: &Incoming,
    class: &str,
    error: &str,
    group: &str,
) -> Vec<(&'static str, Vec<u8>)> {
    let stack = format!(
        "{class}: {error}\n\tat consumer group {group}, {}-{}@{}",
        message.topic, message.partition, message.offset
    );
    let mut headers = vec![
        ("kafka_dlt-exception-fqcn", class.as_bytes().to_vec()),
        ("kafka_dlt-exception-message", error.as_bytes().to_vec()),
        ("kafka_dlt-exception-stacktrace", stack.into_bytes()),
        (
            "kafka_dlt-original-topic",
            message.topic.as_bytes().to_vec(),
        ),
        (
            "kafka_dlt-original-partition",
            message.partition.to_be_bytes().to_vec(),
        ),
        (
            "kafka_dlt-original-offset",
            message.offset.to_be_bytes().to_vec(),
        ),
        (
            "kafka_dlt-original-consumer-group",
            group.as_bytes().to_vec(),
        ),
    ];
    if let Some(timestamp) = message.timestamp_ms {
        headers.push((
            "kafka_dlt-original-timestamp",
            timestamp.to_be_bytes().to_vec(),
        ));
        headers.push(("kafka_dlt-original-timestamp-type", b"CreateTime".to_vec()));
    }
    headers
}

/// Deletes the `processed_events` rows older than `keep`; returns how many.
pub async fn forget_processed(pool: &PgPool, keep: Duration) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "DELETE FROM processed_events WHERE processed_at < now() - make_interval(secs => $1)",
    )
    .bind(keep.as_secs_f64())
    .execute(pool)
    .await
    .map(|done| done.rows_affected())
}

fn incoming(m: &rdkafka::message::BorrowedMessage<'_>) -> Incoming {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Incoming {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
        timestamp_ms: m.timestamp().to_millis(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_commit_is_pending_again_unless_newer_offsets_or_a_new_owner_came() {
        let p0 = ("t".to_owned(), 0);
        let p1 = ("t".to_owned(), 1);
        let mut ownership = Ownership::default();
        ownership.assigned.extend([p0.clone(), p1.clone()]);
        ownership.applied(0, BTreeMap::from([(p0.clone(), 3), (p1.clone(), 5)]));
        let failed = ownership.take_pending();
        assert!(ownership.pending.is_empty());
        // Meanwhile p0 moved on, and p1 went to another member.
        ownership.applied(0, BTreeMap::from([(p0.clone(), 7)]));
        ownership.release([&p1]);
        ownership.retry(failed);
        assert_eq!(ownership.pending, BTreeMap::from([(p0.clone(), 7)]));
        // A revoke commits the highest offset applied, sent or not.
        assert_eq!(ownership.release([&p0]), BTreeMap::from([(p0, 7)]));
    }

    #[test]
    fn connection_trouble_is_transient_and_bad_data_is_not() {
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::other(
            "reset"
        ))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(matches!(
            Failure::from(sqlx::Error::ColumnNotFound("x".into())),
            Failure::Permanent(_)
        ));
    }

    #[test]
    fn only_refused_data_is_permanent_among_database_errors() {
        // Refused data: dead-lettered.
        for code in [
            "22003", "22P02", "23505", "23514", "23503", "21000", "54000", "P0001",
        ] {
            assert!(!transient_sqlstate(code), "{code} is the event's data");
        }
        // The database's state: the round is retried until it is fixed.
        for code in [
            "08006", "40001", "40P01", "25006", "42P01", "42501", "53300", "55P03", "57P01",
            "58030", "XX000",
        ] {
            assert!(transient_sqlstate(code), "{code} is the database's state");
        }
    }
}
