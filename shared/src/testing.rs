//! Helpers for the services' integration tests (feature `testing`): a fresh database
//! per test, a stand-in for the gateway's JWKS endpoint, and the one way a test waits
//! for a condition.

use std::sync::Arc;

use sqlx::{Connection, PgConnection};

use crate::auth::TokenSigner;

/// Sends `request` (raw HTTP/1.1) on a new connection to `address`: the answer's
/// status line, or nothing when the server closed the connection instead of answering
/// (a connection turned away at the cap). Panics after 5 s without either.
pub async fn status_line_or_closed(
    address: impl tokio::net::ToSocketAddrs,
    request: &[u8],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    // A connection turned away may be closed before the request is written.
    let _ = stream.write_all(request).await;
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer or a close within 5 s")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Whether the kernel's keepalive timer is armed (timer 2 in `/proc/net/tcp`) on an
/// IPv4 connection from port `local` to port `remote`: an idle connection whose peer
/// will be probed. A `local` of `None` takes any port but `remote` (the other side's
/// socket of a connection within this machine is left out).
pub fn probes_peer(local: Option<u16>, remote: u16) -> bool {
    let port = |entry: &str| {
        entry
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.len() > 5 && port(fields[2]) == Some(remote))
        .filter(|fields| match local {
            Some(local) => port(fields[1]) == Some(local),
            None => port(fields[1]) != Some(remote),
        })
        .any(|fields| fields[5].starts_with("02:"))
}

/// Polls `check` every 50 ms until it gives a value, and returns it; panics naming
/// `what` when `within` has passed. Every wait in a test has a deadline.
pub async fn eventually<T>(
    within: std::time::Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Creates an empty database next to the one `DATABASE_URL` names (set by
/// `cargo xtask test`) and returns its URL, so each test starts from nothing.
pub async fn fresh_database() -> String {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL names the test database; run the tests with `cargo xtask test`");
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&url)
        .await
        .expect("connect to DATABASE_URL");
    sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let (base, _) = url.rsplit_once('/').expect("a database URL");
    format!("{base}/{name}")
}

/// Serves `signer`'s JWKS at `/.well-known/jwks.json` on a free port, as the gateway
/// does; returns the base URL to use as `auth.gateway_url`.
pub async fn gateway_jwks(signer: Arc<TokenSigner>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let signer = signer.clone();
            async move { axum::Json(signer.jwks()) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// A real SMTP server (aiosmtpd, installed by `cargo xtask test`) writing every
/// message it accepts into a Maildir. Stopped when dropped.
#[derive(Debug)]
pub struct SmtpSink {
    pub port: u16,
    pub maildir: std::path::PathBuf,
    child: std::process::Child,
}

impl SmtpSink {
    /// Starts the sink on `port` (0: a free one), writing into `maildir`.
    pub async fn start(port: u16, maildir: &std::path::Path) -> SmtpSink {
        let port = if port == 0 { free_port() } else { port };
        // An existing folder is taken as a Maildir as it is: give it the three parts.
        for part in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(maildir.join(part)).expect("create the Maildir");
        }
        let python_path = std::env::var("STOREFRONT_PYTHONPATH").expect(
            "STOREFRONT_PYTHONPATH names the Python tools' folders; run the tests with `cargo xtask test`",
        );
        let child = std::process::Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir)
            .env("PYTHONPATH", python_path)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start aiosmtpd");
        let sink = SmtpSink {
            port,
            maildir: maildir.to_path_buf(),
            child,
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "aiosmtpd did not listen on {port}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        sink
    }

    /// Every message delivered so far, as text.
    pub fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago (see [`crate::ports`]).
pub fn free_port() -> u16 {
    crate::ports::unused_loopback_port().expect("a free port")
}

/// Log output written into memory, for tests that read log lines back: give it to a
/// `fmt` layer with `.with_writer(captured.clone())`, then read [`CapturedLog::text`].
#[derive(Debug, Clone, Default)]
pub struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLog {
    /// Everything written so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLog {
    type Writer = CapturedLog;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
