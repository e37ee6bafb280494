//! Tracing, set up once per process: log lines (human-readable for a terminal, JSON
//! lines for a log pipeline) and spans (OpenTelemetry, exported to Zipkin's API when
//! an address is configured). `RUST_LOG`, when set, overrides the configured level
//! filter.
//!
//! The level filter applies to log lines only, and stays changeable while the process
//! runs: [`levels`] reads and sets a logger's level (a tracing target such as
//! `order_service` or `sqlx`, or `ROOT` for the default), which `/actuator/loggers`
//! exposes as Spring Boot does. Spans are made at `INFO` whatever the log level, so
//! quieting the logs never breaks a trace.
//!
//! Trace context crosses process boundaries as a W3C `traceparent`: HTTP headers and
//! Kafka record headers alike. [`continue_trace`] makes a span the child of a received
//! context, and [`traceparent_of`] writes a span's context for the next hop.

use std::{
    collections::BTreeMap,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider},
};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*, reload};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// The `log` section of every process's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,sqlx=warn`.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

/// The `tracing` section of every process's settings: where spans go. `ZIPKIN_URL`
/// sets `zipkin_url` when the section does not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSettings {
    /// The Zipkin server (`http://localhost:9411`); spans are posted to its
    /// `/api/v2/spans`, as Spring's `management.zipkin.tracing.endpoint` does. Unset:
    /// spans still carry the trace through logs and to the next hop, and are dropped.
    pub zipkin_url: Option<String>,
    /// The share of the traces started here that are recorded, from 0 to 1 (Spring's
    /// `management.tracing.sampling.probability`). A caller's decision, in the sampled
    /// flag of its `traceparent`, is followed.
    pub sampling_probability: f64,
    /// How often buffered spans are sent.
    pub export_interval_ms: u64,
    /// CA certificates (PEM files) trusted for an `https://` Zipkin besides the
    /// system's.
    pub ca_files: Vec<std::path::PathBuf>,
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self {
            zipkin_url: None,
            sampling_probability: 1.0,
            export_interval_ms: 1000,
            ca_files: Vec::new(),
        }
    }
}

/// Keeps the span exporter running; dropping it sends what is still buffered. Hold
/// it in `main` until the application has stopped.
#[must_use = "dropping this stops span export"]
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "spans still buffered could not be sent");
        }
    }
}

/// Installs the global subscriber for the process named `service`. A second call
/// (tests start several services in one process) keeps the first subscriber and
/// returns an inert guard. A CA file in `spans.ca_files` that cannot be used is an
/// error naming it.
pub fn init(
    service: &str,
    log: &LogSettings,
    spans: &TracingSettings,
) -> Result<Telemetry, String> {
    install(service, log, spans, true)
}

/// As [`init`], but spans become OpenTelemetry spans only when they are exported
/// (`zipkin_url` set). For the gateway: its request path is the hottest code of the
/// platform, and without the span layer it still carries the trace context by hand
/// (it continues or starts the `traceparent`, and its log lines name the trace).
pub fn init_exporting_only(
    service: &str,
    log: &LogSettings,
    spans: &TracingSettings,
) -> Result<Telemetry, String> {
    install(service, log, spans, spans.zipkin_url.is_some())
}

/// Whether this process's spans become OpenTelemetry spans: false until a subscriber
/// with the span layer is installed.
pub fn spans_recorded() -> bool {
    SPANS_RECORDED.load(std::sync::atomic::Ordering::Relaxed)
}

static SPANS_RECORDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn install(
    service: &str,
    log: &LogSettings,
    spans: &TracingSettings,
    record_spans: bool,
) -> Result<Telemetry, String> {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|d| EnvFilter::try_new(d).is_ok())
        .or_else(|| Some(log.level.clone()).filter(|d| EnvFilter::try_new(d).is_ok()))
        .unwrap_or_else(|| "info".into());
    let state = LevelState::parse(&directives);
    let (admit, handle) = reload::Layer::new(Admit {
        lines: state.filter(),
    });
    let registry = tracing_subscriber::registry().with(admit);
    let lines = match log.format {
        // Colours only for a terminal, and not there either with NO_COLOR: a log
        // file or a collector gets plain text.
        LogFormat::Pretty => fmt::layer()
            .fmt_fields(GatheredFields::default())
            .with_target(true)
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stdout())
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            )
            .compact()
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    // Without span recording (the gateway with no Zipkin) no provider is built: it
    // would have no exporter and nothing would feed it.
    let (provider, layers) = if record_spans {
        let (provider, otel) = span_layer(service, spans)?;
        (Some(provider), vec![otel, lines])
    } else {
        (None, vec![lines])
    };
    if registry.with(layers).try_init().is_err() {
        return Ok(Telemetry::default());
    }
    SPANS_RECORDED.store(record_spans, std::sync::atomic::Ordering::Relaxed);
    let _ = LEVELS.set(Levels {
        reload: Box::new(move |filter| {
            handle
                .modify(|admit| admit.lines = filter)
                .map_err(|e| e.to_string())
        }),
        state: Mutex::new(state),
    });
    match &spans.zipkin_url {
        Some(url) => tracing::info!(zipkin = %url, sampling = spans.sampling_probability,
            "exporting spans to Zipkin"),
        None => tracing::debug!("no tracing.zipkin_url: spans are not exported"),
    }
    Ok(Telemetry { provider })
}

/// Span fields as `DefaultFields` formats them, gathered on the stack and written
/// once. The line layer keeps a span's fields in a string of their own, which would
/// otherwise grow (a reallocation and a copy) field by field, for every span: the
/// gateway makes one per request. On a terminal (ANSI field names) they are written
/// as they come.
#[derive(Debug, Default)]
struct GatheredFields(fmt::format::DefaultFields);

impl<'writer> fmt::FormatFields<'writer> for GatheredFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        if writer.has_ansi_escapes() {
            return self.0.format_fields(writer, fields);
        }
        let mut gathered = Gathered::default();
        self.0
            .format_fields(fmt::format::Writer::new(&mut gathered), fields)?;
        writer.write_str(gathered.as_str()?)
    }
}

/// What was written so far: on the stack while it fits, then on the heap.
struct Gathered {
    buffer: [u8; 256],
    length: usize,
    spilled: String,
}

impl Default for Gathered {
    fn default() -> Self {
        Self {
            buffer: [0; 256],
            length: 0,
            spilled: String::new(),
        }
    }
}

impl Gathered {
    fn as_str(&self) -> Result<&str, std::fmt::Error> {
        if self.spilled.is_empty() {
            // Whole `str`s were copied in, so the bytes are UTF-8.
            std::str::from_utf8(&self.buffer[..self.length]).map_err(|_| std::fmt::Error)
        } else {
            Ok(&self.spilled)
        }
    }
}

impl std::fmt::Write for Gathered {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.length + s.len();
        if self.spilled.is_empty() && end <= self.buffer.len() {
            self.buffer[self.length..end].copy_from_slice(s.as_bytes());
            self.length = end;
        } else {
            if self.spilled.is_empty() {
                let so_far = self.as_str()?.to_owned();
                self.spilled = so_far;
            }
            self.spilled.push_str(s);
        }
        Ok(())
    }
}

/// The process's one filter, in front of every layer: spans at `INFO` and above
/// always (a trace must not depend on the log level), everything else as the log
/// levels say. One global filter rather than a filter per layer: with per-layer
/// filters, the first span made after some sqlx queries reached no layer but the
/// log lines' and so had no trace context, which broke the trace at the outbox.
#[derive(Debug)]
struct Admit {
    lines: EnvFilter,
}

fn always_traced(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && *meta.level() <= tracing::Level::INFO
}

impl<S> Layer<S> for Admit
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        // Always asked first: registering a callsite is where the filter learns its
        // span directives (`[http]=debug`), which must keep working inside spans.
        let lines = Layer::<S>::register_callsite(&self.lines, meta);
        if always_traced(meta) {
            tracing::subscriber::Interest::always()
        } else {
            lines
        }
    }

    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        always_traced(meta) || Layer::<S>::enabled(&self.lines, meta, ctx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        let lines = Layer::<S>::max_level_hint(&self.lines)
            .unwrap_or(tracing::level_filters::LevelFilter::TRACE);
        Some(lines.max(tracing::level_filters::LevelFilter::INFO))
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.lines.on_new_span(attrs, id, ctx);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.lines.on_record(id, values, ctx);
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.lines.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.lines.on_exit(id, ctx);
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.lines.on_close(id, ctx);
    }
}

/// The OpenTelemetry layer for `service`: every span the filter admits becomes an
/// OpenTelemetry span (log events stay log lines), batched to Zipkin when `settings`
/// name it. Public for tests that install a subscriber of their own. A CA file in
/// `settings.ca_files` that cannot be used is an error naming it.
pub fn span_layer<S>(
    service: &str,
    settings: &TracingSettings,
) -> Result<(SdkTracerProvider, Box<dyn Layer<S> + Send + Sync>), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sampling_probability.clamp(0.0, 1.0),
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        );
    if let Some(url) = &settings.zipkin_url {
        let batches = BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_millis(settings.export_interval_ms.max(10)))
            .build();
        builder = builder.with_span_processor(
            BatchSpanProcessor::builder(crate::zipkin::ZipkinExporter::new(
                url,
                service,
                &settings.ca_files,
            )?)
            .with_batch_config(batches)
            .build(),
        );
    }
    let provider = builder.build();
    let tracer = provider.tracer(service.to_owned());
    // No busy and idle times per span: they cost two clock reads on every poll of
    // every instrumented future, and Zipkin has no field for them. No thread names
    // either: an async task moves between threads.
    let layer = SpansOnly(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_tracked_inactivity(false)
            .with_threads(false),
    )
    .boxed();
    Ok((provider, layer))
}

/// A layer that sees spans and never events: log lines stay log lines instead of
/// being copied into every span as span events (which Zipkin's model does not carry
/// anyway). Everything else, `downcast_raw` above all (how a span's OpenTelemetry
/// context is found), goes to the inner layer.
struct SpansOnly<L>(L);

impl<S, L> Layer<S> for SpansOnly<L>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_new_span(attrs, id, ctx);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_record(id, values, ctx);
    }

    fn on_follows_from(
        &self,
        id: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_follows_from(id, follows, ctx);
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_exit(id, ctx);
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_close(id, ctx);
    }

    fn on_id_change(
        &self,
        old: &tracing::span::Id,
        new: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_id_change(old, new, ctx);
    }

    #[allow(unsafe_code)]
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: forwarded unchanged to the inner layer's own implementation, which
        // answers for its type and the types it exposes (OpenTelemetry's context).
        unsafe { self.0.downcast_raw(id) }
    }
}

/// One header, for the propagator.
struct Carrier<'a>(Option<&'a str>);

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0).flatten()
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[derive(Default)]
struct Written(Option<String>);

impl Injector for Written {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// Makes `span` a child of the trace in `traceparent` (a caller's, or an event's),
/// and records the trace id in its `trace_id` field for the log lines. Without a
/// valid context the span starts a trace of its own. Call it before the span is
/// entered.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(value) = traceparent.filter(|v| trace_id(v).is_some()) {
        let parent = TraceContextPropagator::new().extract(&Carrier(Some(value)));
        let _ = span.set_parent(parent);
    }
    if let Some(id) = trace_id_of(span) {
        span.record("trace_id", id.as_str());
    }
}

/// Links `span` to the trace in `traceparent` without continuing it: the edge's way
/// to keep a client's context findable while starting (and sampling) its own trace.
/// Call it before the span is entered.
pub fn link_trace(span: &tracing::Span, traceparent: &str) {
    let linked = TraceContextPropagator::new().extract(&Carrier(Some(traceparent)));
    span.add_link(linked.span().span_context().clone());
}

/// The `traceparent` that continues `span`'s trace at the next hop, when the span
/// layer is installed.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut written = Written::default();
    TraceContextPropagator::new().inject_context(&context, &mut written);
    written.0
}

/// The `traceparent` to store with an event written now: the current span's context
/// (a request's server span, an event's consumer span), else `received` as it came.
pub fn traceparent_here(received: Option<&str>) -> Option<String> {
    traceparent_of(&tracing::Span::current()).or_else(|| received.map(str::to_owned))
}

/// The trace id of `span`, as 32 hex digits, when the span layer is installed.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), when it
/// is one: 32 lower-case hex digits, not all zero.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && hex(flags, 2);
    valid.then_some(trace)
}

/// A request id as clients may send it: 1 to 128 visible ASCII characters.
pub fn request_id(value: &str) -> Option<&str> {
    ((1..=128).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic()))
        .then_some(value)
}

/// A layer for a whole router: each request runs in a server span named after its
/// method and route template, the child of the caller's `traceparent`, carrying
/// `trace_id` and `request_id` (from `X-Request-Id`), so every log line written while
/// serving it names them. A 5xx marks the span as an error.
pub async fn http_span(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    // In a block: a borrow of the request held across the await would make the
    // future not Send (the body is not Sync).
    let span = {
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        let id = header("x-request-id")
            .and_then(request_id)
            .unwrap_or_default();
        let route = request
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map_or("-", |p| p.as_str());
        let span = tracing::info_span!(
            "http",
            otel.name = %format_args!("{} {route}", request.method()),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            method = %request.method(),
            route = %route,
            trace_id = tracing::field::Empty,
            request_id = %id,
            http.response.status_code = tracing::field::Empty,
        );
        continue_trace(&span, header("traceparent"));
        span
    };
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    response
}

static LEVELS: OnceLock<Levels> = OnceLock::new();

/// The process's log levels, when [`init`] installed the subscriber.
pub fn levels() -> Option<&'static Levels> {
    LEVELS.get()
}

/// The levels a logger can have, in Spring Boot's names, most quiet first.
pub const LEVEL_NAMES: [&str; 7] = ["OFF", "FATAL", "ERROR", "WARN", "INFO", "DEBUG", "TRACE"];

/// The live level filter and the directives it was built from.
pub struct Levels {
    /// Replaces the log lines' filter.
    reload: Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>,
    state: Mutex<LevelState>,
}

impl std::fmt::Debug for Levels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Levels")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// One logger's level, as `/actuator/loggers/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoggerLevel {
    /// Set for this logger itself; `null` when it inherits.
    pub configured_level: Option<String>,
    /// What applies to it.
    pub effective_level: String,
}

impl Levels {
    /// Every logger with a level of its own, `ROOT` first.
    pub fn all(&self) -> BTreeMap<String, LoggerLevel> {
        let state = self.lock();
        let mut all = BTreeMap::new();
        all.insert("ROOT".to_owned(), state.level_of("ROOT"));
        for target in state.targets.keys() {
            all.insert(target.clone(), state.level_of(target));
        }
        all
    }

    /// One logger (`ROOT` or a target).
    pub fn get(&self, name: &str) -> LoggerLevel {
        self.lock().level_of(name)
    }

    /// Sets `name`'s level (one of [`LEVEL_NAMES`], any case), or with `None` removes
    /// its own level (for `ROOT`: back to the level the process started with).
    pub fn set(&self, name: &str, level: Option<&str>) -> Result<(), String> {
        let level = match level {
            None => None,
            Some(level) => Some(
                filter_level(level)
                    .ok_or_else(|| format!("must be one of {}", LEVEL_NAMES.join(", ")))?,
            ),
        };
        let mut state = self.lock();
        let mut next = state.clone();
        match (name, level) {
            ("ROOT", Some(level)) => next.root = level.to_owned(),
            ("ROOT", None) => next.root = next.initial_root.clone(),
            (target, Some(level)) => {
                next.targets.insert(target.to_owned(), level.to_owned());
            }
            (target, None) => {
                next.targets.remove(target);
            }
        }
        (self.reload)(next.filter())
            .map_err(|e| format!("the filter could not be replaced: {e}"))?;
        *state = next;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LevelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `name` can name a logger: `ROOT`, or a tracing target (letters, digits,
/// `_`, `-` and `::`-separated paths), at most 200 characters.
pub fn is_logger_name(name: &str) -> bool {
    name == "ROOT"
        || ((1..=200).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':')))
}

/// Spring's level name as an `EnvFilter` level.
fn filter_level(level: &str) -> Option<&'static str> {
    Some(match level.to_ascii_uppercase().as_str() {
        "OFF" => "off",
        "FATAL" | "ERROR" => "error",
        "WARN" => "warn",
        "INFO" => "info",
        "DEBUG" => "debug",
        "TRACE" => "trace",
        _ => return None,
    })
}

/// The directives as the root level, per-target levels, and anything else kept as
/// written (span and field directives).
#[derive(Debug, Clone, PartialEq, Eq)]
struct LevelState {
    root: String,
    initial_root: String,
    targets: BTreeMap<String, String>,
    other: Vec<String>,
}

impl LevelState {
    fn parse(directives: &str) -> Self {
        let mut root = "info".to_owned();
        let mut targets = BTreeMap::new();
        let mut other = Vec::new();
        for directive in directives
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
        {
            let simple = !directive.contains(['[', '{']);
            match directive.split_once('=') {
                Some((target, level)) if simple && filter_level(level).is_some() => {
                    let level = filter_level(level).unwrap_or("info");
                    targets.insert(target.to_owned(), level.to_owned());
                }
                None if filter_level(directive).is_some() => {
                    root = filter_level(directive).unwrap_or("info").to_owned();
                }
                _ => other.push(directive.to_owned()),
            }
        }
        Self {
            initial_root: root.clone(),
            root,
            targets,
            other,
        }
    }

    fn filter(&self) -> EnvFilter {
        let mut directives = vec![self.root.clone()];
        directives.extend(self.targets.iter().map(|(t, l)| format!("{t}={l}")));
        directives.extend(self.other.iter().cloned());
        EnvFilter::try_new(directives.join(",")).unwrap_or_else(|_| EnvFilter::new("info"))
    }

    /// As `EnvFilter` decides: the longest configured target that `name` starts with.
    fn level_of(&self, name: &str) -> LoggerLevel {
        let spring = |level: &str| level.to_ascii_uppercase();
        if name == "ROOT" {
            return LoggerLevel {
                configured_level: Some(spring(&self.root)),
                effective_level: spring(&self.root),
            };
        }
        let effective = self
            .targets
            .iter()
            .filter(|(target, _)| name.starts_with(target.as_str()))
            .max_by_key(|(target, _)| target.len())
            .map_or(&self.root, |(_, level)| level);
        LoggerLevel {
            configured_level: self.targets.get(name).map(|l| spring(l)),
            effective_level: spring(effective),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines a compact, colourless layer writes for a span with a long field and
    /// a field recorded later, and an event in it.
    fn compact_lines<N>(fields: N) -> String
    where
        N: for<'w> fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry().with(
            fmt::layer()
                .fmt_fields(fields)
                .with_ansi(false)
                .without_time()
                .compact()
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let long = "x".repeat(300);
            let span = tracing::info_span!(
                "http",
                trace_id = %"4bf92f3577b34da6a3ce929d0e0e4736",
                request_id = "quoted \"id\"",
                long = %long,
                later = tracing::field::Empty,
            );
            span.record("later", 7);
            let _entered = span.enter();
            tracing::info!(status = 200, "request");
            let short = tracing::info_span!("short", id = 1);
            let _entered = short.enter();
            tracing::info!("inner");
        });
        let text = lines.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn gathered_span_fields_read_as_the_default_ones() {
        let gathered = compact_lines(GatheredFields::default());
        assert_eq!(gathered, compact_lines(fmt::format::DefaultFields::new()));
        assert!(gathered.contains(&"x".repeat(300)), "{gathered}");
        assert!(gathered.contains("later=7"), "{gathered}");
    }

    #[test]
    fn directives_become_root_targets_and_the_rest() {
        let state = LevelState::parse("warn,sqlx=ERROR,order_service::orders=debug,h2[conn]=off");
        assert_eq!(state.root, "warn");
        assert_eq!(state.targets["sqlx"], "error");
        assert_eq!(state.other, ["h2[conn]=off"]);
        assert_eq!(
            state.level_of("order_service::orders::create"),
            LoggerLevel {
                configured_level: None,
                effective_level: "DEBUG".into()
            }
        );
        assert_eq!(state.level_of("order_service").effective_level, "WARN");
        assert_eq!(
            state.level_of("sqlx").configured_level.as_deref(),
            Some("ERROR")
        );
        assert_eq!(state.level_of("ROOT").effective_level, "WARN");
        let fatal = LevelState::parse("fatal,db=FATAL");
        assert_eq!(
            (fatal.root.as_str(), fatal.targets["db"].as_str()),
            ("error", "error")
        );
    }

    #[test]
    fn trace_ids_come_only_from_well_formed_traceparents() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(valid), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
        assert_eq!(request_id("req-1"), Some("req-1"));
        assert_eq!(request_id("has space"), None);
    }

    /// Records the names of new spans and the messages of events it is shown.
    #[derive(Clone, Default)]
    struct Seen(std::sync::Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> Layer<S> for Seen {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            self.0
                .lock()
                .expect("lock")
                .push(format!("span {}", attrs.metadata().name()));
        }

        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0
                .lock()
                .expect("lock")
                .push(format!("event {}", message.0));
        }
    }

    #[test]
    fn spans_survive_a_quiet_log_level_and_span_directives_still_apply() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(Admit {
                lines: EnvFilter::new("warn,[checkout]=debug"),
            })
            .with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("quiet at warn");
            let checkout = tracing::info_span!("checkout");
            checkout.in_scope(|| tracing::debug!("inside checkout"));
            let other = tracing::info_span!("other");
            other.in_scope(|| tracing::debug!("inside other"));
            tracing::warn!("loud enough");
        });
        let seen = seen.0.lock().expect("lock").clone();
        assert_eq!(
            seen,
            [
                "span checkout",
                "event inside checkout",
                "span other",
                "event loud enough"
            ]
        );
    }

    #[test]
    fn spring_level_names_map_and_nonsense_is_not_a_level() {
        assert_eq!(filter_level("fatal"), Some("error"));
        assert_eq!(filter_level("Debug"), Some("debug"));
        assert_eq!(filter_level("loud"), None);
        assert!(is_logger_name("order_service::orders"));
        assert!(!is_logger_name("a b"));
        assert!(!is_logger_name(&"a".repeat(201)));
    }
}
