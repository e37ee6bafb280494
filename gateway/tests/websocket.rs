//! WebSocket upgrades through the gateway, as Spring Cloud Gateway passes them: on an
//! `lb:ws://` route, on a plain `lb://` route and on a fixed `ws://` one, the client's
//! handshake (with its bearer token) reaches an instance with the route's filters
//! applied and the gateway's forwarding headers set, and frames then flow both ways;
//! a handshake without a token is refused like any request; an open WebSocket counts
//! toward the connection cap.

mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use shared::{
    registry::{InstanceRegistration, RegistryClient},
    testing::eventually,
};
use support::{registry, registry_settings};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

/// What the upstream saw of each handshake: its path, `X-Forwarded-For` and
/// `X-Request-Id`.
type Seen = Arc<Mutex<Vec<(String, Option<String>, Option<String>)>>>;

/// A WebSocket upstream that echoes every text frame, prefixed with `name`.
async fn echo_upstream(name: &'static str, seen: Seen) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let record =
                    |request: &tungstenite::handshake::server::Request,
                     response: tungstenite::handshake::server::Response| {
                        let header = |n: &str| {
                            request
                                .headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        seen.lock().expect("lock").push((
                            request.uri().path().to_owned(),
                            header("x-forwarded-for"),
                            header("x-request-id"),
                        ));
                        Ok(response)
                    };
                let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, record).await
                else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if let Message::Text(text) = message {
                        let reply = format!("{name}: {text}");
                        if socket.send(Message::text(reply)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A registry with `upstream` registered as the one instance of `chat`.
async fn registry_with_chat(
    upstream: SocketAddr,
) -> (SocketAddr, tokio_util::sync::CancellationToken) {
    let (registry, stop) = registry().await;
    let settings = registry_settings(registry);
    RegistryClient::new(&settings)
        .expect("registry client")
        .register(
            &InstanceRegistration::for_bound("chat", upstream, &settings),
            60,
        )
        .await
        .expect("register chat");
    (registry, stop)
}

/// A WebSocket to `/chat/lobby` through the gateway at `base`, once the gateway
/// knows the chat instance.
async fn lobby(
    base: &str,
    bearer: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let gateway = base.replacen("http://", "ws://", 1);
    let (socket, _) = eventually(
        Duration::from_secs(10),
        "the gateway upgrades /chat to the chat instance",
        async || {
            let mut request = format!("{gateway}/chat/lobby")
                .into_client_request()
                .expect("a request");
            request
                .headers_mut()
                .insert("authorization", bearer.parse().expect("header"));
            tokio_tungstenite::connect_async(request).await.ok()
        },
    )
    .await;
    socket
}

/// Sends `text` and waits (at most 10 s) for the frame that answers it.
async fn say(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    text: &str,
) -> Message {
    socket.send(Message::text(text)).await.expect("send");
    tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("a reply in time")
        .expect("the socket stays open")
        .expect("a frame")
}

const ROUTES: &str = r#"
routes:
  - id: chat
    uri: lb:ws://chat
    predicates: ["Path=/chat/**"]
    filters: [StripPrefix=1]
  - id: chat-plain
    uri: lb://chat
    predicates: ["Path=/plain/**"]
    filters: ["RewritePath=/plain/(?<rest>.*), /room/${rest}"]
  - id: fixed
    uri: ws://FIXED
    predicates: ["Path=/fixed/**"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through_to_the_instance() {
    let seen: Seen = Arc::default();
    let upstream = echo_upstream("chat-1", seen.clone()).await;
    let fixed_seen: Seen = Arc::default();
    let fixed = echo_upstream("fixed", fixed_seen.clone()).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _stop_registry) = registry_with_chat(upstream).await;
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, ROUTES.replace("FIXED", &fixed.to_string())).expect("routes");
    let (base, _stop) =
        support::start_gateway(support::gateway_settings(registry, &routes_file)).await;
    let bearer = support::alice_bearer(&base).await;
    let gateway = base.replacen("http://", "ws://", 1);
    let connect = async |path: &str, bearer: Option<&str>| {
        let mut request = format!("{gateway}{path}")
            .into_client_request()
            .expect("a request");
        if let Some(bearer) = bearer {
            request
                .headers_mut()
                .insert("authorization", bearer.parse().expect("header"));
        }
        tokio_tungstenite::connect_async(request).await
    };

    // The gateway learns of the instance through the registry.
    let (mut socket, response) = eventually(
        Duration::from_secs(10),
        "the gateway upgrades /chat to the chat instance",
        async || connect("/chat/lobby", Some(&bearer)).await.ok(),
    )
    .await;
    assert_eq!(response.status(), 101);
    for text in ["hello", "again"] {
        assert_eq!(
            say(&mut socket, text).await,
            Message::text(format!("chat-1: {text}"))
        );
    }
    socket.close(None).await.expect("close");
    {
        let seen = seen.lock().expect("lock");
        let (path, forwarded_for, request_id) = seen.last().expect("a handshake");
        assert_eq!(path, "/lobby", "StripPrefix ran on the handshake");
        assert_eq!(
            forwarded_for.as_deref(),
            Some("127.0.0.1"),
            "the gateway's X-Forwarded-For"
        );
        assert!(request_id.is_some(), "a request id");
    }

    // An upgrade on a plain lb:// route passes too, through its filters.
    let (mut socket, _) = connect("/plain/kitchen", Some(&bearer))
        .await
        .expect("upgrade on lb://");
    socket.send(Message::text("hi")).await.expect("send");
    let reply = socket.next().await.expect("open").expect("frame");
    assert_eq!(reply, Message::text("chat-1: hi"));
    assert_eq!(
        seen.lock().expect("lock").last().map(|s| s.0.clone()),
        Some("/room/kitchen".to_owned()),
        "RewritePath ran on the handshake"
    );

    // A fixed ws:// route.
    let (mut socket, _) = connect("/fixed/x", Some(&bearer))
        .await
        .expect("upgrade on ws://");
    socket.send(Message::text("yo")).await.expect("send");
    let reply = socket.next().await.expect("open").expect("frame");
    assert_eq!(reply, Message::text("fixed: yo"));

    // Without a token the handshake is refused like any request, and nothing reaches
    // the upstream.
    let before = seen.lock().expect("lock").len();
    match connect("/chat/lobby", None).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("a handshake without a token got {other:?}"),
    }
    assert_eq!(seen.lock().expect("lock").len(), before);
}

/// A joined WebSocket holds its client connection's place under the gateway's
/// connection cap until it closes: upgraded connections cannot pile up past the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_counts_toward_the_connection_cap() {
    let upstream = echo_upstream("chat-1", Seen::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _stop_registry) = registry_with_chat(upstream).await;
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, ROUTES.replace("FIXED", "127.0.0.1:9")).expect("routes");
    let mut gateway_settings = support::gateway_settings(registry, &routes_file);
    // One worker holding one connection at most.
    gateway_settings.workers = 1;
    gateway_settings.http.limits.max_connections = 1;
    let (base, _stop) = support::start_gateway(gateway_settings).await;
    let bearer = support::alice_bearer(&base).await;
    let address = base.trim_start_matches("http://").to_owned();
    let health = async || {
        shared::testing::status_line_or_closed(
            address.as_str(),
            b"GET /actuator/health HTTP/1.1\r\nHost: gateway\r\n\r\n",
        )
        .await
    };

    let mut socket = lobby(&base, &bearer).await;
    assert_eq!(
        say(&mut socket, "hello").await,
        Message::text("chat-1: hello")
    );

    // The open WebSocket holds the only place, busy: a newcomer is turned away.
    assert_eq!(health().await, "", "a connection past the cap was served");

    // Closed, it gives its place back.
    socket.close(None).await.expect("close");
    drop(socket);
    eventually(
        Duration::from_secs(10),
        "health answers once the WebSocket has closed",
        async || health().await.starts_with("HTTP/1.1 200").then_some(()),
    )
    .await;
}

/// A joined WebSocket that carries nothing for `upstream.websocket_idle_timeout_ms` is
/// closed; one that keeps talking stays open well past that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_websocket_is_closed_after_the_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(1000);
    let upstream = echo_upstream("chat-1", Seen::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _stop_registry) = registry_with_chat(upstream).await;
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, ROUTES.replace("FIXED", "127.0.0.1:9")).expect("routes");
    let mut gateway_settings = support::gateway_settings(registry, &routes_file);
    gateway_settings.upstream.websocket_idle_timeout_ms = IDLE.as_millis() as u64;
    let (base, _stop) = support::start_gateway(gateway_settings).await;
    let bearer = support::alice_bearer(&base).await;
    let mut socket = lobby(&base, &bearer).await;

    // Talking every tenth of the idle time, for three times the idle time: it stays.
    let talked_until = std::time::Instant::now() + IDLE * 3;
    let mut exchanged = 0;
    let mut last_reply = std::time::Instant::now();
    while std::time::Instant::now() < talked_until {
        assert_eq!(
            say(&mut socket, "ping").await,
            Message::text("chat-1: ping")
        );
        last_reply = std::time::Instant::now();
        exchanged += 1;
        tokio::time::sleep(IDLE / 10).await;
    }
    assert!(exchanged >= 10, "{exchanged} exchanges");

    // Silent, it is closed: the client's read ends without a frame.
    let ended = tokio::time::timeout(Duration::from_secs(30), socket.next())
        .await
        .expect("the gateway closes a silent WebSocket");
    assert!(
        !matches!(ended, Some(Ok(Message::Text(_)))),
        "no frame came, the connection ended: {ended:?}"
    );
    // The last byte crossed just before the last reply arrived.
    assert!(
        last_reply.elapsed() >= IDLE / 2,
        "closed for silence, not at once: {:?} after the last byte",
        last_reply.elapsed()
    );
}
