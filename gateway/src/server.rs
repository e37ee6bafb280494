//! Serving the way nginx does: one worker thread per core, each with its own
//! single-threaded runtime, its own listener on the shared port (`SO_REUSEPORT`, so
//! the kernel spreads connections) and its own upstream connection pool.
//!
//! A proxy's work is short and I/O bound. On a work-stealing runtime every request
//! crosses threads several times (the accept, the client connection's task, the
//! upstream connection's task), and each crossing is a wake-up through the kernel.
//! Here a request and both of its connections stay on one thread from accept to
//! response: the gateway benchmark gained about a fifth of its throughput from this
//! alone (`docs/benchmarks.md`).

use std::{
    cell::Cell,
    net::{SocketAddr, ToSocketAddrs},
};

use tokio_util::sync::CancellationToken;

thread_local! {
    /// The index of the worker this thread is, if it is one.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker serving on this thread: pools and other per-worker state are picked by
/// it. Threads that are not workers (tests, background tasks) count as worker 0.
pub fn current_worker() -> usize {
    WORKER.with(Cell::get).unwrap_or(0)
}

/// How many workers `configured` means: 0 is one per core.
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// `workers` listeners on one address. The first binds `host:port` (port 0: any free
/// port); the others share the port it got.
pub fn bind(host: &str, port: u16, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let named = format!("{host}:{port}");
    let with_name =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {named}: {e}"));
    let mut addr = (host, port)
        .to_socket_addrs()
        .map_err(with_name)?
        .next()
        .ok_or_else(|| with_name(std::io::ErrorKind::AddrNotAvailable.into()))?;
    if addr.port() != 0 {
        // Sockets with SO_REUSEPORT share a port silently: a second gateway started on
        // the same port by mistake would take half the connections instead of failing.
        // A bind without SO_REUSEPORT first refuses a port anyone listens on, reusable
        // or not (SO_REUSEADDR only lets it past connections still in TIME_WAIT from a
        // previous run).
        drop(socket(addr, false).map_err(with_name)?);
    }
    let workers = workers.max(1);
    let mut listeners = Vec::with_capacity(workers);
    for _ in 0..workers {
        let listener = listen(addr).map_err(with_name)?;
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket(addr, true)?;
    socket.set_nonblocking(true)?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A TCP socket bound to `addr`, sharing the port with other workers when `shared`.
fn socket(addr: SocketAddr, shared: bool) -> std::io::Result<socket2::Socket> {
    let domain = match addr {
        SocketAddr::V4(_) => socket2::Domain::IPV4,
        SocketAddr::V6(_) => socket2::Domain::IPV6,
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Serves `router` on every listener, one worker thread each, until `stop` is
/// cancelled; then each worker stops accepting and finishes the requests in flight.
/// Returns when every worker has; the first error, if any.
pub async fn serve(
    listeners: Vec<std::net::TcpListener>,
    router: crate::Front,
    stop: CancellationToken,
    limits: shared::config::ConnectionLimits,
    tls: Option<shared::tls::TlsAcceptor>,
) -> std::io::Result<()> {
    let listeners_count = listeners.len().max(1);
    let mut finished = Vec::with_capacity(listeners.len());
    for (index, listener) in listeners.into_iter().enumerate() {
        let (done, finish) = tokio::sync::oneshot::channel();
        let router = router.clone();
        let tls = tls.clone();
        let worker_stop = stop.clone();
        // Each worker holds its own share of the connection cap.
        let limits = shared::config::ConnectionLimits {
            max_connections: limits.max_connections.div_ceil(listeners_count).max(1),
            ..limits.clone()
        };
        let spawned = std::thread::Builder::new()
            .name(format!("gateway-worker-{index}"))
            .spawn(move || {
                // However a worker ends (stopped, failed, panicked), the others stop
                // too: a gateway on fewer cores than configured is not what was asked.
                let _stop_all = worker_stop.clone().drop_guard();
                WORKER.with(|w| w.set(Some(index)));
                let _ = done.send(run_worker(listener, router, worker_stop, &limits, tls));
            });
        if let Err(e) = spawned {
            stop.cancel();
            return Err(e);
        }
        finished.push(finish);
    }
    let mut first_error = None;
    for finish in finished {
        let result = finish
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("a gateway worker panicked")));
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn run_worker(
    listener: std::net::TcpListener,
    router: crate::Front,
    stop: CancellationToken,
    limits: &shared::config::ConnectionLimits,
    tls: Option<shared::tls::TlsAcceptor>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        shared::server::serve(listener, router, stop, limits, tls).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listener_shares_the_first_ones_port() {
        let listeners = bind("127.0.0.1", 0, 3).unwrap();
        assert_eq!(listeners.len(), 3);
        let port = listeners[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for listener in &listeners {
            assert_eq!(listener.local_addr().unwrap().port(), port);
        }
    }

    #[test]
    fn a_taken_port_is_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let error = bind("127.0.0.1", port, 2).unwrap_err();
        assert!(
            error.to_string().contains(&format!("127.0.0.1:{port}")),
            "{error}"
        );
    }

    #[test]
    fn a_port_another_gateway_serves_is_refused() {
        let first = bind("127.0.0.1", 0, 2).unwrap();
        let port = first[0].local_addr().unwrap().port();
        let error = bind("127.0.0.1", port, 2).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse, "{error}");
    }

    #[test]
    fn a_port_is_bound_again_while_connections_of_the_last_run_are_in_time_wait() {
        use std::io::Read;
        let port = {
            let listeners = bind("127.0.0.1", 0, 1).unwrap();
            let port = listeners[0].local_addr().unwrap().port();
            let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            listeners[0].set_nonblocking(false).unwrap();
            let (server_side, _) = listeners[0].accept().unwrap();
            // The server closes first, so its side of the connection enters TIME_WAIT.
            drop(server_side);
            let _ = client.read(&mut [0; 1]);
            port
        };
        let again = bind("127.0.0.1", port, 2);
        assert!(again.is_ok(), "{again:?}");
    }

    #[test]
    fn zero_workers_means_one_per_core() {
        assert!(worker_count(0) >= 1);
        assert_eq!(worker_count(3), 3);
    }
}
