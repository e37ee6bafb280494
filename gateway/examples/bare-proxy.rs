//! The floor for the gateway benchmark: the smallest proxy built from the same parts
//! as the gateway (hyper's HTTP/1 server and pooled client, one single-threaded
//! runtime and `SO_REUSEPORT` listener per core), forwarding every request to one
//! fixed upstream with nothing else: no routes, tokens, headers, retries, timeouts or
//! metrics. What the gateway costs beyond it is what its features cost.
//!
//! With `--gateway-headers` it also puts on the wire the headers the gateway adds in
//! the benchmark, with values of the same length but fixed: `X-Forwarded-For`,
//! `-Proto`, `-Host`, `X-Request-Id` and `traceparent` upstream, `SecureHeaders` and
//! `X-Request-Id` back. Sent the gateway's bearer token as well, it shows how much of
//! the features' cost is those bytes, which the client and the upstream pay too.
//!
//! `bare-proxy <listen port> <upstream host:port> [--gateway-headers]`;
//! `cargo xtask bench gateway` runs it both ways.

use std::net::SocketAddr;

use hyper::{
    HeaderMap, Request,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: bare-proxy <listen port> <upstream host:port> [--gateway-headers]");
    };
    let port: u16 = port.parse()?;
    let headers = match args.next().as_deref() {
        None => false,
        Some("--gateway-headers") => true,
        Some(other) => anyhow::bail!("unknown option {other}"),
    };
    let workers = gateway::server::worker_count(0);
    let listeners = gateway::server::bind("127.0.0.1", port, workers)?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let upstream = upstream.clone();
            std::thread::spawn(move || serve(listener, upstream, headers))
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    Ok(())
}

fn serve(listener: std::net::TcpListener, upstream: String, headers: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build(connector);
        loop {
            let (stream, peer): (_, SocketAddr) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let (client, upstream) = (client.clone(), upstream.clone());
            let peer = HeaderValue::from_str(&peer.ip().to_string())?;
            tokio::spawn(async move {
                let forward = service_fn(move |mut request: Request<Incoming>| {
                    let client = client.clone();
                    let target = format!("http://{upstream}{}", request.uri().path());
                    if headers {
                        add_request_headers(request.headers_mut(), &peer);
                    }
                    async move {
                        *request.uri_mut() = target.parse()?;
                        let mut response = client.request(request).await?;
                        if headers {
                            add_response_headers(response.headers_mut());
                        }
                        anyhow::Ok(response)
                    }
                });
                let _closed = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), forward)
                    .await;
            });
        }
    })
}

/// Fixed values as long as the gateway's generated ones.
const REQUEST_ID: HeaderValue = HeaderValue::from_static("6f1c2b9e-4d3a-4f8e-9b7c-2a5d8e1f0c34");
const TRACEPARENT: HeaderValue =
    HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");

/// What the gateway adds to a request in the benchmark.
fn add_request_headers(headers: &mut HeaderMap, peer: &HeaderValue) {
    let host = headers.get(header::HOST).cloned();
    headers.insert("x-forwarded-for", peer.clone());
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host);
    }
    headers.insert("x-request-id", REQUEST_ID);
    headers.insert("traceparent", TRACEPARENT);
}

/// What the gateway adds to a response in the benchmark (its `SecureHeaders` default
/// filter, and the request id).
fn add_response_headers(headers: &mut HeaderMap) {
    for (name, value) in &gateway::plan::SECURE_HEADERS {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert("x-request-id", REQUEST_ID);
}
