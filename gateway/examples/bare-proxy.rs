//! The floor for the gateway benchmark: the smallest proxy built from the same parts
//! as the gateway (hyper's HTTP/1 server and pooled client, one single-threaded
//! runtime and `SO_REUSEPORT` listener per core), forwarding every request to one
//! fixed upstream with nothing else: no routes, tokens, headers, retries, timeouts or
//! metrics. What the gateway costs beyond it is what its features cost.
//!
//! `bare-proxy <listen port> <upstream host:port>`; `cargo xtask bench gateway` runs it.

use std::net::SocketAddr;

use hyper::{Request, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: bare-proxy <listen port> <upstream host:port>");
    };
    let port: u16 = port.parse()?;
    let workers = gateway::server::worker_count(0);
    let listeners = gateway::server::bind("127.0.0.1", port, workers)?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let upstream = upstream.clone();
            std::thread::spawn(move || serve(listener, upstream))
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    Ok(())
}

fn serve(listener: std::net::TcpListener, upstream: String) -> anyhow::Result<()> {
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
            let (stream, _): (_, SocketAddr) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let (client, upstream) = (client.clone(), upstream.clone());
            tokio::spawn(async move {
                let forward = service_fn(move |mut request: Request<Incoming>| {
                    let client = client.clone();
                    let target = format!("http://{upstream}{}", request.uri().path());
                    async move {
                        *request.uri_mut() = target.parse()?;
                        anyhow::Ok(client.request(request).await?)
                    }
                });
                let _closed = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), forward)
                    .await;
            });
        }
    })
}
