//! Tracing, set up once per process: human-readable for a terminal, JSON lines for a
//! log pipeline. `RUST_LOG`, when set, overrides the configured level filter.
//!
//! The level filter stays changeable while the process runs: [`levels`] reads and
//! sets a logger's level (a tracing target such as `order_service` or `sqlx`, or
//! `ROOT` for the default), which `/actuator/loggers` exposes as Spring Boot does.

use std::{
    collections::BTreeMap,
    sync::{Mutex, OnceLock},
};

use serde::{Deserialize, Serialize};
use tracing_subscriber::{EnvFilter, Registry, fmt, prelude::*, reload};

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

/// Installs the global subscriber. A second call (tests start several services in
/// one process) keeps the first subscriber and returns quietly.
pub fn init(settings: &LogSettings) {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|d| EnvFilter::try_new(d).is_ok())
        .or_else(|| Some(settings.level.clone()).filter(|d| EnvFilter::try_new(d).is_ok()))
        .unwrap_or_else(|| "info".into());
    let state = LevelState::parse(&directives);
    let (filter, handle) = reload::Layer::new(state.filter());
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match settings.format {
        LogFormat::Pretty => registry
            .with(fmt::layer().with_target(true).compact())
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init(),
    };
    if installed.is_ok() {
        let _ = LEVELS.set(Levels {
            handle,
            state: Mutex::new(state),
        });
    }
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

/// A layer for a whole router: each request runs in an `http` span carrying its
/// method, route template, `trace_id` (from `traceparent`) and `request_id` (from
/// `X-Request-Id`), so every log line written while serving it names them.
pub async fn http_span(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    // In a block: a borrow of the request held across the await would make the
    // future not Send (the body is not Sync).
    let (trace, id) = {
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        let trace = header("traceparent").and_then(trace_id).unwrap_or_default();
        let id = header("x-request-id")
            .and_then(request_id)
            .unwrap_or_default();
        (trace.to_owned(), id.to_owned())
    };
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("-", |p| p.as_str())
        .to_owned();
    let span = tracing::info_span!(
        "http",
        method = %request.method(),
        route = %route,
        trace_id = %trace,
        request_id = %id,
    );
    next.run(request).instrument(span).await
}

static LEVELS: OnceLock<Levels> = OnceLock::new();

/// The process's log levels, when [`init`] installed the subscriber.
pub fn levels() -> Option<&'static Levels> {
    LEVELS.get()
}

/// The levels a logger can have, in Spring Boot's names, most quiet first.
pub const LEVEL_NAMES: [&str; 7] = ["OFF", "FATAL", "ERROR", "WARN", "INFO", "DEBUG", "TRACE"];

/// The live level filter and the directives it was built from.
#[derive(Debug)]
pub struct Levels {
    handle: reload::Handle<EnvFilter, Registry>,
    state: Mutex<LevelState>,
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
        self.handle
            .reload(next.filter())
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
