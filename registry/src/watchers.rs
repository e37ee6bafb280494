//! Room for the requests that stay open by design: watch streams and blocking
//! queries. Each holds its connection busy, and a busy connection is never shed for a
//! newcomer, so without a bound a client (reads need no token by default) could open
//! them until the connection cap turned away heartbeats and registrations. At most
//! `leases.max_watchers` are open at once, and at most `max_watchers_per_client` from
//! one client address (an IPv6 client by its /64, which one host commonly holds);
//! past either, 503 with `Retry-After`.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use axum::response::IntoResponse;
use shared::Problem;

/// The open watch streams and blocking queries, counted.
#[derive(Debug)]
pub struct Watchers {
    max: usize,
    max_per_client: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// One open watch or blocking query's room; given back when dropped.
#[derive(Debug)]
pub struct Place {
    watchers: Arc<Watchers>,
    client: IpAddr,
}

/// A full house: 503 with `Retry-After`.
#[derive(Debug)]
pub struct Full(Problem);

impl IntoResponse for Full {
    fn into_response(self) -> axum::response::Response {
        self.0.retry_after(5)
    }
}

impl Watchers {
    pub fn new(max: usize, max_per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            max_per_client: max_per_client.max(1),
            open: Mutex::new(Open::default()),
        })
    }

    /// Room for one more from `client`, if there is any.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Place, Full> {
        let client = key(client);
        let mut open = self.lock();
        let from_client = open.by_client.get(&client).copied().unwrap_or(0);
        if open.total >= self.max {
            return Err(Full(Problem::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} watches and blocking queries are open, the most this registry \
                     keeps (leases.max_watchers); retry later, or read without `index`.",
                    self.max
                ),
            )));
        }
        if from_client >= self.max_per_client {
            return Err(Full(Problem::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "This client already has {} watches and blocking queries open, the most \
                     one client may (leases.max_watchers_per_client); close some first.",
                    self.max_per_client
                ),
            )));
        }
        open.total += 1;
        *open.by_client.entry(client).or_default() += 1;
        Ok(Place {
            watchers: self.clone(),
            client,
        })
    }

    /// How many are open.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.watchers.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.by_client.remove(&self.client);
            }
        }
    }
}

/// The address a client is counted by: an IPv6 address by its /64.
fn key(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_bounded_in_all_and_per_client_and_given_back() {
        let watchers = Watchers::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = watchers.admit(a).expect("room");
        let _second = watchers.admit(a).expect("room");
        assert!(watchers.admit(a).is_err(), "a third from one client");
        let _third = watchers.admit(b).expect("another client");
        assert!(watchers.admit(b).is_err(), "past the total");
        drop(first);
        let _again = watchers.admit(a).expect("room given back");
        assert_eq!(watchers.open(), 3);
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let watchers = Watchers::new(10, 1);
        let one: IpAddr = "2001:db8::1".parse().expect("ip");
        let same_64: IpAddr = "2001:db8::ffff:1".parse().expect("ip");
        let other_64: IpAddr = "2001:db8:0:1::1".parse().expect("ip");
        let _held = watchers.admit(one).expect("room");
        assert!(watchers.admit(same_64).is_err());
        assert!(watchers.admit(other_64).is_ok());
    }
}
