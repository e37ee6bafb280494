//! Layered configuration, the same for every process.
//!
//! Later layers win: built-in defaults (the settings type's `Default`), then an optional
//! file named by `<PREFIX>CONFIG` (TOML or YAML by extension), then environment
//! variables, first the stack-wide ones a service opts into (such as `DATABASE_URL`),
//! then `<PREFIX>...` variables where `__` separates nesting levels:
//! `ORDER_DATABASE__URL` sets `database.url` for the prefix `ORDER_`.
//!
//! A value that does not fit its key stops start-up with an error naming the key and
//! where the value came from; unknown keys are refused too when the settings type says
//! `#[serde(deny_unknown_fields)]`, which catches typos in files.

use std::path::PathBuf;

/// The variables `cargo xtask up` writes to `target/stack.env`. They describe the
/// stack, not one process, so they are never read as a process's prefixed settings
/// (`GATEWAY_URL` is not the gateway's `url`); a process opts into one explicitly
/// with [`Layers::fallback_env`].
pub const STACK_ENV_VARS: &[&str] = &[
    "GATEWAY_URL",
    "REGISTRY_URL",
    "REGISTRY_TOKEN",
    "KAFKA_BROKERS",
    "DATABASE_URL",
];

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml, Yaml},
};
use serde::{Serialize, de::DeserializeOwned};

/// Why configuration could not be loaded. The message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} (from {var}) does not exist")]
    MissingFile { path: PathBuf, var: String },
    #[error("configuration file {path} must end in .toml, .yaml or .yml")]
    UnknownFormat { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Builder for one process's configuration layers.
#[derive(Debug, Clone)]
pub struct Layers {
    prefix: String,
    /// Stack-wide variables mapped onto keys, e.g. `DATABASE_URL` onto `database.url`.
    fallbacks: Vec<(String, String)>,
}

impl Layers {
    /// Layers for a process whose variables start with `prefix` (e.g. `"ORDER_"`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            fallbacks: Vec::new(),
        }
    }

    /// Reads the stack-wide variable `var` into `key` (dotted), below the prefixed
    /// variables. This is what lets a new instance start from `target/stack.env`.
    pub fn fallback_env(mut self, var: &str, key: &str) -> Self {
        self.fallbacks.push((var.to_owned(), key.to_owned()));
        self
    }

    /// `ZIPKIN_URL` for `tracing.zipkin_url`: where every process sends its spans.
    pub fn spans(self) -> Self {
        self.fallback_env("ZIPKIN_URL", "tracing.zipkin_url")
    }

    /// The stack-wide registry variables, `REGISTRY_URL` and `REGISTRY_TOKEN`, into the
    /// `registry` section every registering service has.
    pub fn registry_client(self) -> Self {
        self.fallback_env("REGISTRY_URL", "registry.urls")
            .fallback_env("REGISTRY_TOKEN", "registry.token")
    }

    /// The stack-wide `GATEWAY_URL` into `auth.gateway_url`, whose JWKS a service
    /// behind the gateway trusts.
    pub fn gateway_tokens(self) -> Self {
        self.fallback_env("GATEWAY_URL", "auth.gateway_url")
    }

    /// The environment variable that names the optional configuration file.
    pub fn file_var(&self) -> String {
        format!("{}CONFIG", self.prefix)
    }

    /// Loads `T` from every layer, reading the real process environment.
    pub fn load<T>(&self) -> Result<T, ConfigError>
    where
        T: Serialize + DeserializeOwned + Default,
    {
        let mut figment = Figment::from(Serialized::defaults(T::default()));

        let file_var = self.file_var();
        if let Some(path) = std::env::var_os(&file_var).map(PathBuf::from) {
            if !path.exists() {
                return Err(ConfigError::MissingFile {
                    path,
                    var: file_var,
                });
            }
            figment = match path.extension().and_then(|e| e.to_str()) {
                Some("toml") => figment.merge(Toml::file_exact(&path)),
                Some("yaml" | "yml") => figment.merge(Yaml::file_exact(&path)),
                _ => return Err(ConfigError::UnknownFormat { path }),
            };
        }

        for (var, key) in &self.fallbacks {
            let key = key.clone();
            figment = figment.merge(
                Env::raw()
                    .only(&[var.as_str()])
                    .map(move |_| key.clone().into())
                    .split("."),
            );
        }

        let mut ignored = vec!["CONFIG"];
        ignored.extend(
            STACK_ENV_VARS
                .iter()
                .filter_map(|var| var.strip_prefix(self.prefix.as_str())),
        );
        figment = figment.merge(
            Env::prefixed(&self.prefix)
                .ignore(&ignored)
                .split("__")
                .lowercase(true),
        );

        figment.extract().map_err(|err| {
            let messages: Vec<String> = err.into_iter().map(|e| e.to_string()).collect();
            ConfigError::Invalid(messages.join("; "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Settings {
        port: u16,
        database: Db,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Db {
        url: String,
        max_connections: u32,
    }

    impl Default for Settings {
        fn default() -> Self {
            Self {
                port: 8080,
                database: Db::default(),
            }
        }
    }

    impl Default for Db {
        fn default() -> Self {
            Self {
                url: "postgres://localhost/app".into(),
                max_connections: 10,
            }
        }
    }

    // figment::Jail isolates environment variables and the working directory per test.
    #[test]
    fn later_layers_win_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("svc.toml", "port = 9000\n[database]\nmax_connections = 3\n")?;
            jail.set_env("SVC_CONFIG", "svc.toml");
            jail.set_env("DATABASE_URL", "postgres://stack/db");
            jail.set_env("SVC_DATABASE__MAX_CONNECTIONS", "7");
            let s: Settings = Layers::new("SVC_")
                .fallback_env("DATABASE_URL", "database.url")
                .load()
                .map_err(|e| e.to_string())?;
            assert_eq!(s.port, 9000, "file overrides default");
            assert_eq!(
                s.database.url, "postgres://stack/db",
                "stack-wide env applies"
            );
            assert_eq!(s.database.max_connections, 7, "prefixed env overrides file");
            Ok(())
        });
    }

    #[test]
    fn prefixed_env_beats_stack_wide_env() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATABASE_URL", "postgres://stack/db");
            jail.set_env("SVC_DATABASE__URL", "postgres://own/db");
            let s: Settings = Layers::new("SVC_")
                .fallback_env("DATABASE_URL", "database.url")
                .load()
                .map_err(|e| e.to_string())?;
            assert_eq!(s.database.url, "postgres://own/db");
            Ok(())
        });
    }

    #[test]
    fn stack_wide_variables_are_not_prefixed_settings() {
        figment::Jail::expect_with(|jail| {
            // deny_unknown_fields would refuse `url` if GATEWAY_URL were read as a setting.
            jail.set_env("GATEWAY_URL", "http://127.0.0.1:8080");
            jail.set_env("GATEWAY_PORT", "9");
            let s: Settings = Layers::new("GATEWAY_").load().map_err(|e| e.to_string())?;
            assert_eq!(s.port, 9);
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_names_its_key_and_source() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SVC_PORT", "eighty");
            let err = Layers::new("SVC_")
                .load::<Settings>()
                .unwrap_err()
                .to_string();
            assert!(err.to_lowercase().contains("key \"port\""), "{err}");
            assert!(err.contains("SVC_"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_in_a_file_is_refused_by_name() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("svc.yaml", "prot: 1\n")?;
            jail.set_env("SVC_CONFIG", "svc.yaml");
            let err = Layers::new("SVC_")
                .load::<Settings>()
                .unwrap_err()
                .to_string();
            assert!(err.contains("prot"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_is_an_error_not_silence() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SVC_CONFIG", "nope.toml");
            let err = Layers::new("SVC_").load::<Settings>().unwrap_err();
            assert!(matches!(err, ConfigError::MissingFile { .. }), "{err}");
            Ok(())
        });
    }
}

pub use crate::server::ConnectionLimits;

/// The `http` section of every process: where it listens, and what it allows clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub host: String,
    /// 0 binds any free port; the process registers the port it really bound.
    pub port: u16,
    /// Timeouts and the connection cap every client connection is held to.
    pub limits: crate::server::ConnectionLimits,
    /// The store's services (order, payment, notification): the longest a request
    /// may take before it is answered 503 and its work (a transaction included) is
    /// abandoned. The gateway and the registry bound their own waits.
    pub request_timeout_ms: u64,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1) with this certificate instead of plain
    /// HTTP; renewed files are picked up without a restart.
    pub tls: Option<crate::tls::ServerTlsSettings>,
}

impl HttpSettings {
    /// Loopback on `port`.
    pub fn local(port: u16) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port,
            limits: crate::server::ConnectionLimits::default(),
            request_timeout_ms: 30_000,
            tls: None,
        }
    }

    /// The TLS acceptor of `tls`, when set; unreadable or mismatched files are an
    /// error naming them.
    pub fn tls_acceptor(&self) -> anyhow::Result<Option<crate::tls::TlsAcceptor>> {
        self.tls
            .as_ref()
            .map(crate::tls::server_acceptor)
            .transpose()
            .map_err(anyhow::Error::msg)
    }

    /// Binds the listener, naming the address when that fails.
    pub async fn bind(&self) -> std::io::Result<tokio::net::TcpListener> {
        let addr = format!("{}:{}", self.host, self.port);
        tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self::local(0)
    }
}

/// The `database` section of a service that owns tables. The URL carries a password,
/// so `Debug` hides it.
#[derive(Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    pub max_connections: u32,
    /// Apply the service's migrations at start-up (off when a deploy job runs them).
    pub migrate: bool,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("migrate", &self.migrate)
            .finish()
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/storefront".into(),
            max_connections: 10,
            migrate: true,
        }
    }
}

/// A URL with any password replaced, fit for a log line.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod redact_tests {
    use super::*;

    #[test]
    fn passwords_never_reach_debug_output() {
        let db = DatabaseSettings {
            url: "postgres://app:s3cret@db:5432/x".into(),
            max_connections: 1,
            migrate: false,
        };
        let shown = format!("{db:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("postgres://app:***@db:5432/x"), "{shown}");
    }
}
