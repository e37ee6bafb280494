//! The one HTTP server loop every process uses (the registry, the three services and
//! each gateway worker), with the limits that keep hostile clients from holding it:
//!
//! - **Header and idle timeout** (`header_read_timeout_ms`): from a connection's start,
//!   or the end of its last response, to the end of the next request's headers. A
//!   client that trickles its headers, or keeps a connection idle, longer than that is
//!   disconnected.
//! - **Body read timeout** (`body_read_timeout_ms`): the longest wait for the next
//!   piece of a request body; a stalled upload ends with an error, freeing the handler.
//! - **Connection cap** (`max_connections`): at the cap, a new connection makes room by
//!   closing the oldest connection that has no request in progress (slow clients that
//!   never finish their headers are exactly those), so health checks and real clients
//!   keep getting in while slow ones are shed. Only when every connection is busy with
//!   a request is the new one refused.
//! - **Peer probes** (TCP keepalive): a connection silent for a minute is probed, and
//!   closed when its peer has vanished (its machine gone, a NAT entry dropped) within
//!   about two minutes. A busy connection has no other end: without probes, a dead
//!   client's WebSocket or event stream would hold its place under the cap forever.
//!
//! Requests in progress are never cut by these limits: a long poll or an event stream
//! counts as busy until its response ends. A connection taken over by an HTTP/1.1
//! `Upgrade` (a WebSocket) counts as busy until it ends too, when whoever serves it
//! keeps its [`ConnectionPlace`]: otherwise upgraded connections would escape the cap.
//!
//! With a TLS acceptor (`http.tls`, see [`crate::tls`]) the same loop serves HTTPS:
//! the handshake must finish within the header timeout, and the protocol the client
//! chose by ALPN decides between HTTP/2 and HTTP/1.1. Every request carries a
//! [`Scheme`] extension saying which the connection was.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::ConnectInfo,
};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

/// `http.limits`: what every server allows a client connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// From a connection's start, or the end of its last response, to the end of the
    /// next request's headers.
    pub header_read_timeout_ms: u64,
    /// The longest wait for the next piece of a request body.
    pub body_read_timeout_ms: u64,
    /// The slowest a request body may come, in bytes per second, once the server has
    /// waited on it for longer than `body_read_timeout_ms` in all (0: no minimum). A
    /// body trickled a byte at a time, each just inside the read timeout, would
    /// otherwise keep its connection busy, and never shed, for as long as its declared
    /// length lasts. Only time spent waiting on the client counts, not time the
    /// handler (or the upstream the gateway streams it to) takes to read it. 240, as
    /// ASP.NET Core's Kestrel requires.
    pub body_min_bytes_per_second: u64,
    /// Open connections at most.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            // Above every client pool's idle timeout we know of (the gateway's 4 s,
            // Node's 5 s), so a pooled connection is closed by its client first.
            header_read_timeout_ms: 20_000,
            body_read_timeout_ms: 20_000,
            body_min_bytes_per_second: 240,
            max_connections: 4096,
        }
    }
}

/// A bound listener, what it serves and how: the arguments of [`serve`], for the
/// callers that pass them on.
#[derive(Debug)]
pub struct Server {
    pub listener: TcpListener,
    pub router: Router,
    pub limits: ConnectionLimits,
    pub tls: Option<crate::tls::TlsAcceptor>,
}

/// The scheme the client used to reach this server: a request extension, for the
/// headers and links that must name it (`X-Forwarded-Proto`). Set only for `https`:
/// a request without it came over `http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme(pub &'static str);

/// A connection's place under the cap, as a request extension on a request that may
/// take its connection over (HTTP/1.1 with an `Upgrade` header). Whoever serves the
/// upgraded connection keeps it for as long as the connection lives: the connection
/// then still counts toward `max_connections`, as busy (never shed for a newcomer),
/// after hyper has handed it over. Dropped with the request otherwise.
/// (Clones share one place.)
#[derive(Debug, Clone)]
pub struct ConnectionPlace {
    _held: Arc<(Arc<Slot>, InProgress)>,
}

/// What a server hands each request to: anything that always answers. Every
/// infallible tower service is one (an axum `Router`). A handler of its own can name
/// its future `impl Future`: the connection then keeps that future in its one slot
/// for the request in progress, where a tower service's unnameable future would be
/// boxed anew for every request.
pub trait Answer: Clone + Send + 'static {
    /// The answer to `request`, which came from `peer`.
    fn answer(
        &self,
        request: axum::extract::Request,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = axum::response::Response> + Send + 'static + use<Self>;
}

impl<S> Answer for S
where
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    /// The peer is the request's `ConnectInfo`, as axum's handlers read it.
    fn answer(
        &self,
        mut request: axum::extract::Request,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = axum::response::Response> + Send + 'static + use<S> {
        request.extensions_mut().insert(ConnectInfo(peer));
        let service = self.clone();
        async move {
            match service.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    }
}

/// Serves `router` (an axum `Router`, or anything else that always answers) on
/// `listener` within `limits` until `shutdown` is cancelled; then stops accepting,
/// closes idle connections and lets requests in progress finish. With `tls`, every
/// connection is TLS (HTTP/2 or HTTP/1.1 by ALPN).
pub async fn serve<S: Answer>(
    listener: TcpListener,
    router: S,
    shutdown: CancellationToken,
    limits: &ConnectionLimits,
    tls: Option<crate::tls::TlsAcceptor>,
) -> std::io::Result<()> {
    let scheme = Scheme(if tls.is_some() { "https" } else { "http" });
    let table = Arc::new(Table::new(limits.max_connections.max(1)));
    let tracker = TaskTracker::new();
    let header_timeout = Duration::from_millis(limits.header_read_timeout_ms.max(1));
    let body_timeout = BodyTimeouts {
        stall: Duration::from_millis(limits.body_read_timeout_ms.max(1)),
        min_rate: limits.body_min_bytes_per_second,
    };
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors, most likely: connections will close, so
                    // wait a moment rather than spin on the error.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = table.admit() else {
            metrics::counter!("http_connections_refused_total").increment(1);
            continue;
        };
        let _ = stream.set_nodelay(true);
        probe_peer(&stream);
        let router = router.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        let slot = Arc::new(slot);
        tracker.spawn(async move {
            let place = slot.clone();
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let in_progress = InProgress::start(place.busy.clone());
                // A request without a body (most are) gets the empty one, which costs
                // no allocation; a body that may stall is read under the timeout.
                let mut request = request.map(|body| match body.is_end_stream() {
                    true => Body::empty(),
                    false => Body::new(ReadTimeout::new(body, body_timeout)),
                });
                // `http` goes without saying (readers default to it): one boxed
                // extension fewer per request.
                if scheme.0 != "http" {
                    request.extensions_mut().insert(scheme);
                }
                if request.version() == axum::http::Version::HTTP_11
                    && request.headers().contains_key(axum::http::header::UPGRADE)
                {
                    request.extensions_mut().insert(ConnectionPlace {
                        _held: Arc::new((place.clone(), InProgress::start(place.busy.clone()))),
                    });
                }
                // HTTP/2 may split `Cookie` into several fields; HTTP/1.1 upstreams
                // and handlers expect one, joined with "; " (RFC 9113, 8.2.3).
                if request.version() == axum::http::Version::HTTP_2
                    && request
                        .headers()
                        .get_all(axum::http::header::COOKIE)
                        .iter()
                        .count()
                        > 1
                {
                    let joined = request
                        .headers()
                        .get_all(axum::http::header::COOKIE)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect::<Vec<_>>()
                        .join("; ");
                    if let Ok(value) = axum::http::HeaderValue::from_str(&joined) {
                        request
                            .headers_mut()
                            .insert(axum::http::header::COOKIE, value);
                    }
                }
                // HTTP/2 names the host in the `:authority` pseudo-header; the routing
                // and forwarding code reads `Host`, as for HTTP/1.1.
                if !request.headers().contains_key(axum::http::header::HOST)
                    && let Some(authority) = request.uri().authority()
                    && let Ok(host) = axum::http::HeaderValue::from_str(authority.as_str())
                {
                    request.headers_mut().insert(axum::http::header::HOST, host);
                }
                let answer = router.answer(request, peer);
                async move {
                    let response = answer.await;
                    // Not boxed again: hyper takes the wrapper as it is.
                    Ok::<_, Infallible>(response.map(|body| Finishing {
                        body,
                        in_progress: Some(in_progress),
                    }))
                }
            });
            match tls {
                None => drive(stream, false, service, header_timeout, &slot, &shutdown).await,
                Some(acceptor) => {
                    // The handshake counts against the header timeout: a client that
                    // never finishes its hello is dropped like one that never sends
                    // its headers.
                    let handshake = tokio::time::timeout(header_timeout, acceptor.accept(stream));
                    let accepted = tokio::select! {
                        accepted = handshake => accepted,
                        () = slot.evicted.cancelled() => return,
                        () = shutdown.cancelled() => return,
                    };
                    match accepted {
                        Ok(Ok(stream)) => {
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            // Boxed: a TLS stream is large, and a plain connection's
                            // task would otherwise keep room for it, idle or not.
                            Box::pin(drive(stream, h2, service, header_timeout, &slot, &shutdown))
                                .await;
                        }
                        Ok(Err(e)) => {
                            metrics::counter!("http_tls_handshakes_failed_total").increment(1);
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!("http_tls_handshakes_failed_total").increment(1);
                        }
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Silent this long, a connection's peer is probed; unanswered probes, this often and
/// this many, close it: a vanished peer is found within two minutes. (The gateway
/// probes its upstream connections the same way.)
pub const PROBE_AFTER: Duration = Duration::from_secs(60);
/// See [`PROBE_AFTER`].
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// See [`PROBE_AFTER`].
pub const PROBES: u32 = 6;

/// Turns TCP keepalive on for an accepted connection (see the module's docs). A
/// socket that refuses it is served without.
fn probe_peer(stream: &tokio::net::TcpStream) {
    let probes = socket2::TcpKeepalive::new()
        .with_time(PROBE_AFTER)
        .with_interval(PROBE_EVERY)
        .with_retries(PROBES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&probes) {
        tracing::debug!(error = %e, "TCP keepalive could not be set on a connection");
    }
}

/// Serves one connection until it ends, is evicted, or (gracefully) until shutdown.
async fn drive<I, S>(
    io: I,
    h2: bool,
    service: S,
    header_timeout: Duration,
    slot: &Slot,
    shutdown: &CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<Finishing>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        // HTTP/2 has no header timeout; pings find the peers that are gone. (An idle
        // but live HTTP/2 connection stays until the connection cap evicts it.)
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(header_timeout))
            .keep_alive_timeout(header_timeout)
            .serve_connection(io, service);
        // Boxed: an HTTP/2 connection's state is twice an HTTP/1 one's, and every
        // connection's task would otherwise be as large (HTTP/2 comes only over TLS).
        Box::pin(until_done(
            connection,
            |c| c.graceful_shutdown(),
            slot,
            shutdown,
        ))
        .await;
    } else {
        // With upgrades: a WebSocket handshake hands the connection over to whoever
        // answered it `101` (the gateway, which joins it to the upstream's).
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(io, service)
            .with_upgrades();
        until_done(connection, |c| c.graceful_shutdown(), slot, shutdown).await;
    }
}

/// Runs `connection` until it ends or its slot is evicted; at shutdown, it finishes
/// the requests in progress and takes no more.
async fn until_done<C>(
    connection: C,
    graceful_shutdown: impl Fn(std::pin::Pin<&mut C>),
    slot: &Slot,
    shutdown: &CancellationToken,
) where
    C: std::future::Future,
{
    enum Stop {
        Now,
        Gracefully,
    }
    let mut connection = std::pin::pin!(connection);
    // The connection's task wakes several times per request, and a token's future
    // takes two locks each time it is polled: the tokens are looked at only when one
    // of them woke the task.
    let stop = WhenWoken::new(async {
        tokio::select! {
            biased;
            () = slot.evicted.cancelled() => Stop::Now,
            () = shutdown.cancelled() => Stop::Gracefully,
        }
    });
    tokio::select! {
        biased;
        _ = connection.as_mut() => {}
        stop = stop => match stop {
            Stop::Now => {}
            Stop::Gracefully => {
                graceful_shutdown(connection.as_mut());
                tokio::select! {
                    _ = connection.as_mut() => {}
                    () = slot.evicted.cancelled() => {}
                }
            }
        },
    }
}

/// A future polled only after it woke its task (and once at first), however often
/// the task is woken by others.
struct WhenWoken<F> {
    inner: Pin<Box<F>>,
    signal: Arc<Woken>,
    waker: std::task::Waker,
}

/// Whether the inner future woke, and the task to wake then.
#[derive(Default)]
struct Woken {
    woken: std::sync::atomic::AtomicBool,
    task: futures::task::AtomicWaker,
}

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: std::future::Future> WhenWoken<F> {
    fn new(inner: F) -> Self {
        let signal = Arc::new(Woken::default());
        signal.woken.store(true, Ordering::Relaxed);
        Self {
            inner: Box::pin(inner),
            waker: std::task::Waker::from(signal.clone()),
            signal,
        }
    }
}

impl<F: std::future::Future> std::future::Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read: a wake in between is seen now or
        // wakes the task again.
        self.signal.task.register(cx.waker());
        if !self.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

/// The open connections, oldest first, each with its count of requests in progress.
#[derive(Debug)]
struct Table {
    max: usize,
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, (Arc<AtomicUsize>, CancellationToken)>>,
}

impl Table {
    fn new(max: usize) -> Self {
        Self {
            max,
            next: AtomicU64::new(0),
            open: Mutex::new(BTreeMap::new()),
        }
    }

    /// A slot for a new connection; at the cap, the oldest idle connection is closed
    /// to make room. `None` when every connection has a request in progress.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= self.max {
            let idle = open
                .iter()
                .find(|(_, (busy, _))| busy.load(Ordering::SeqCst) == 0)
                .map(|(id, _)| *id)?;
            if let Some((_, evicted)) = open.remove(&idle) {
                evicted.cancel();
                metrics::counter!("http_connections_shed_total").increment(1);
            }
        }
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let busy = Arc::new(AtomicUsize::new(0));
        let evicted = CancellationToken::new();
        open.insert(id, (busy.clone(), evicted.clone()));
        Some(Slot {
            id,
            table: self.clone(),
            busy,
            evicted,
        })
    }
}

/// One connection's place in the table, given back when the connection ends.
#[derive(Debug)]
struct Slot {
    id: u64,
    table: Arc<Table>,
    busy: Arc<AtomicUsize>,
    evicted: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// A request in progress on its connection, from its headers to its response's end.
#[derive(Debug)]
struct InProgress(Arc<AtomicUsize>);

impl InProgress {
    fn start(busy: Arc<AtomicUsize>) -> Self {
        busy.fetch_add(1, Ordering::SeqCst);
        Self(busy)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that ends its request's [`InProgress`] when it ends (or is
/// dropped, when the client goes away).
struct Finishing {
    body: Body,
    in_progress: Option<InProgress>,
}

impl HttpBody for Finishing {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.in_progress = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How long a request body may keep the server waiting.
#[derive(Debug, Clone, Copy)]
struct BodyTimeouts {
    /// For its next piece.
    stall: Duration,
    /// On average, in bytes per second, once the waits add up to more than `stall`.
    min_rate: u64,
}

/// A request body whose next piece must come within `stall` of being asked for, and
/// that must keep up `min_rate` over the time spent waiting on it.
struct ReadTimeout {
    body: Incoming,
    timeouts: BodyTimeouts,
    /// Armed while a piece is awaited.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Since when the current piece has been awaited, if the client was slower than
    /// the reader (a body already buffered costs no clock read).
    waiting_since: Option<std::time::Instant>,
    /// Time spent waiting on the client so far, and the bytes that came.
    waited: Duration,
    received: u64,
}

impl ReadTimeout {
    fn new(body: Incoming, timeouts: BodyTimeouts) -> Self {
        Self {
            body,
            timeouts,
            deadline: None,
            waiting_since: None,
            waited: Duration::ZERO,
            received: 0,
        }
    }

    /// Whether the body, having come this far, is slower than the minimum rate.
    fn too_slow(&self) -> bool {
        let BodyTimeouts { stall, min_rate } = self.timeouts;
        if min_rate == 0 || self.waited <= stall {
            return false;
        }
        let owed = u128::from(min_rate) * self.waited.as_millis() / 1000;
        u128::from(self.received) < owed
    }
}

/// What a stalled request body ends with (the source of the error a handler's read
/// of it gets; see [`BodyFailure`]).
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for longer than {0:?}")]
struct BodyStalled(Duration);

/// What a request body slower than the minimum rate ends with (as [`BodyStalled`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "the request body came slower than {min_rate} bytes per second ({received} bytes in {waited:?} of waiting)"
)]
struct BodyTooSlow {
    min_rate: u64,
    received: u64,
    waited: Duration,
}

/// Why reading a request body failed, as its error's chain of sources tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFailure {
    /// Past the reader's length limit (`http_body_util::Limited`, as axum's
    /// `to_bytes` applies it).
    TooLarge,
    /// Stalled past the read timeout, or below the minimum rate; says which.
    TooSlow(String),
    /// Broken off, or anything else.
    Other,
}

impl BodyFailure {
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if e.is::<http_body_util::LengthLimitError>() {
                return Self::TooLarge;
            }
            if e.is::<BodyStalled>() || e.is::<BodyTooSlow>() {
                return Self::TooSlow(e.to_string());
            }
            cause = e.source();
        }
        Self::Other
    }
}

impl HttpBody for ReadTimeout {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.deadline = None;
                if let Some(since) = self.waiting_since.take() {
                    self.waited += since.elapsed();
                }
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref))
                    && let Some(data) = data
                {
                    self.received += data.len() as u64;
                }
                if frame.is_some() && self.too_slow() {
                    return Poll::Ready(Some(Err(Box::new(BodyTooSlow {
                        min_rate: self.timeouts.min_rate,
                        received: self.received,
                        waited: self.waited,
                    }))));
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = self.timeouts.stall;
                if self.waiting_since.is_none() {
                    self.waiting_since = Some(std::time::Instant::now());
                }
                let deadline = self
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_accepted_connection_probes_its_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let _client = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let socket = socket2::SockRef::from(&accepted);
        assert!(!socket.keepalive().expect("read SO_KEEPALIVE"));
        probe_peer(&accepted);
        assert!(socket.keepalive().expect("read SO_KEEPALIVE"));
        assert_eq!(socket.tcp_keepalive_time().expect("read"), PROBE_AFTER);
        assert_eq!(socket.tcp_keepalive_interval().expect("read"), PROBE_EVERY);
        assert_eq!(socket.tcp_keepalive_retries().expect("read"), PROBES);
    }

    /// A future that counts its polls and keeps the last waker it was given.
    struct Counted {
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<std::task::Waker>>>,
        ready: Arc<std::sync::atomic::AtomicBool>,
    }

    impl std::future::Future for Counted {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn a_when_woken_future_is_polled_only_after_it_woke() {
        use std::future::Future;
        let polls = Arc::new(AtomicUsize::new(0));
        let waker = Arc::new(Mutex::new(None));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut future = WhenWoken::new(Counted {
            polls: polls.clone(),
            waker: waker.clone(),
            ready: ready.clone(),
        });
        let task = Arc::new(Woken::default());
        let task_waker = std::task::Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        for _ in 0..5 {
            assert!(Pin::new(&mut future).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once, at first");
        ready.store(true, Ordering::SeqCst);
        let inner_waker = waker.lock().unwrap().take().expect("a waker kept");
        inner_waker.wake();
        assert!(
            task.woken.load(Ordering::SeqCst),
            "its waking wakes the task"
        );
        assert!(Pin::new(&mut future).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let table = Arc::new(Table::new(2));
        let first = table.admit().expect("first");
        let second = table.admit().expect("second");
        let _working = InProgress::start(first.busy.clone());
        let third = table.admit().expect("room made");
        assert!(!first.evicted.is_cancelled(), "a busy connection stays");
        assert!(second.evicted.is_cancelled(), "the oldest idle one goes");
        let _also_working = InProgress::start(third.busy.clone());
        assert!(table.admit().is_none(), "every connection is busy");
        drop(second);
        drop(first);
        assert!(table.admit().is_some());
    }
}
