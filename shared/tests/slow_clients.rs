//! Hostile connections against the server loop every process uses: headers trickled
//! or never finished, keep-alive connections left idle, bodies that stall or trickle
//! below the minimum rate (and slow ones above it that are read whole), and more
//! slow clients than the connection cap, while health keeps answering; connections
//! taken over by an upgrade still count toward the cap; idle connections' peers are
//! probed, so a vanished one does not hold its place forever.

use std::time::Duration;

use axum::{Router, body::Bytes, routing::get, routing::post};
use shared::config::ConnectionLimits;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

const HEALTH: &[u8] = b"GET /actuator/health HTTP/1.1\r\nHost: test\r\n\r\n";

struct Server {
    addr: std::net::SocketAddr,
    _stop: tokio_util::sync::DropGuard,
}

async fn server(limits: ConnectionLimits) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = Router::new()
        .route("/actuator/health", get(|| async { "UP" }))
        .route("/echo", get(echo_upgrade))
        .route(
            "/upload",
            post(|body: Bytes| async move { body.len().to_string() }),
        );
    let stop = CancellationToken::new();
    let serving = stop.clone();
    tokio::spawn(
        async move { shared::server::serve(listener, router, serving, &limits, None).await },
    );
    Server {
        addr,
        _stop: stop.drop_guard(),
    }
}

/// Takes the connection over (`101`) and echoes what comes until the client closes,
/// keeping the connection's place under the cap as the gateway's WebSocket joins do.
async fn echo_upgrade(mut request: axum::extract::Request) -> axum::response::Response {
    let place = request
        .extensions_mut()
        .remove::<shared::server::ConnectionPlace>();
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let _place = place;
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        let mut buf = [0u8; 256];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    axum::response::Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(axum::body::Body::empty())
        .expect("a 101")
}

fn limits(header_ms: u64, body_ms: u64, max: usize) -> ConnectionLimits {
    ConnectionLimits {
        header_read_timeout_ms: header_ms,
        body_read_timeout_ms: body_ms,
        max_connections: max,
        ..ConnectionLimits::default()
    }
}

/// Reads until the server closes the connection; what it sent. Fails after `within`.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> String {
    let mut seen = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open past {within:?}"
    );
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn headers_that_never_finish_are_cut_off() {
    let server = server(limits(300, 10_000, 100)).await;
    let mut slow = TcpStream::connect(server.addr).await.expect("connect");
    slow.write_all(b"GET /actuator/health HTTP/1.1\r\nHost: te")
        .await
        .expect("send");
    until_closed(&mut slow, Duration::from_secs(5)).await;
    // A connection that sends nothing at all goes the same way.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    until_closed(&mut silent, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let server = server(limits(300, 10_000, 100)).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(HEALTH).await.expect("send");
    let said = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
}

#[tokio::test]
async fn a_stalled_body_ends_the_request() {
    let server = server(limits(10_000, 300, 100)).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .expect("send");
    let said = until_closed(&mut stream, Duration::from_secs(5)).await;
    // Whatever the handler makes of it, it is not left waiting for the other 90 bytes.
    assert!(!said.contains("200 OK"), "{said}");
}

/// Sends `pieces` pieces of `size` bytes of a body, one every `every`, after headers
/// declaring them all; stops when the server stops reading.
fn trickle(
    mut stream: tokio::net::tcp::OwnedWriteHalf,
    size: usize,
    pieces: usize,
    every: Duration,
) {
    tokio::spawn(async move {
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
            size * pieces
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for _ in 0..pieces {
            tokio::time::sleep(every).await;
            if stream.write_all(&vec![b'x'; size]).await.is_err() {
                return;
            }
        }
        // Kept open: a client that closes its side is one that went away.
        std::future::pending::<()>().await;
        drop(stream);
    });
}

#[tokio::test]
async fn a_body_trickled_inside_the_read_timeout_is_cut_off_below_the_minimum_rate() {
    // Each byte comes well inside the 1 s read timeout, 10 bytes a second: a thousand
    // of them would keep the connection busy for 100 s.
    let server = server(limits(10_000, 1_000, 100)).await;
    let (mut read, write) = TcpStream::connect(server.addr)
        .await
        .expect("connect")
        .into_split();
    trickle(write, 1, 1000, Duration::from_millis(100));
    let mut seen = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut seen)).await;
    assert!(ended.is_ok(), "the trickled body kept its connection");
    let said = String::from_utf8_lossy(&seen);
    assert!(said.starts_with("HTTP/1.1 400"), "{said}");
    assert!(said.contains("slower than 240 bytes per second"), "{said}");
}

#[tokio::test]
async fn a_slow_body_above_the_minimum_rate_is_read_whole() {
    // 100 bytes every 100 ms (1,000 bytes a second) for 2 s: slow, but not hostile.
    let server = server(limits(10_000, 1_000, 100)).await;
    let (mut read, write) = TcpStream::connect(server.addr)
        .await
        .expect("connect")
        .into_split();
    trickle(write, 100, 20, Duration::from_millis(100));
    let mut head = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), read.read(&mut head))
        .await
        .expect("an answer in time")
        .expect("read");
    let said = String::from_utf8_lossy(&head[..n]);
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
    assert!(said.ends_with("2000"), "the whole body: {said}");
}

#[tokio::test]
async fn health_answers_while_more_slow_clients_than_the_cap_are_shed() {
    let server = server(limits(60_000, 60_000, 8)).await;
    let mut slow = Vec::new();
    for _ in 0..30 {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.write_all(b"GET / HTTP/1.1\r\n").await.expect("send");
        slow.push(stream);
        // Long timeouts: only the cap can make room, by shedding the oldest of them.
        let status = health(server.addr).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
    // The oldest slow clients were closed to make that room.
    until_closed(&mut slow[0], Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_upgraded_connection_counts_toward_the_cap_until_it_ends() {
    let server = server(limits(60_000, 60_000, 1)).await;
    let mut upgraded = TcpStream::connect(server.addr).await.expect("connect");
    upgraded
        .write_all(
            b"GET /echo HTTP/1.1\r\nHost: test\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), upgraded.read(&mut byte))
            .await
            .expect("the handshake's answer within 5 s")
            .expect("read");
        assert_eq!(n, 1, "closed during the handshake: {head:?}");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    // The connection is the handler's now (hyper has let go of it), and alive.
    upgraded.write_all(b"ping").await.expect("send");
    let mut echoed = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), upgraded.read_exact(&mut echoed))
        .await
        .expect("an echo within 5 s")
        .expect("read");
    assert_eq!(&echoed, b"ping");

    // It holds the only place, busy: a newcomer is turned away, not answered.
    let status = health(server.addr).await;
    assert_eq!(status, "", "a connection past the cap was served");

    // Once it ends, its place is free again.
    drop(upgraded);
    shared::testing::eventually(
        Duration::from_secs(5),
        "health answers once the upgraded connection has ended",
        async || {
            health(server.addr)
                .await
                .starts_with("HTTP/1.1 200")
                .then_some(())
        },
    )
    .await;
}

/// One health check on a new connection: its status line, or nothing when the server
/// closed the connection instead of answering.
async fn health(addr: std::net::SocketAddr) -> String {
    shared::testing::status_line_or_closed(addr, HEALTH).await
}

#[tokio::test]
async fn the_server_probes_an_idle_connections_peer() {
    let server = server(limits(60_000, 60_000, 10)).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(HEALTH).await.expect("send");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The server's side of this connection, idle now, has the kernel's keepalive
    // timer armed: its peer will be probed.
    let client_port = stream.local_addr().expect("addr").port();
    shared::testing::eventually(
        Duration::from_secs(5),
        "the server's socket has its keepalive timer armed",
        async || shared::testing::probes_peer(Some(server.addr.port()), client_port).then_some(()),
    )
    .await;
}
