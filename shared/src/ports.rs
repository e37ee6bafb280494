//! Loopback ports for processes that are told their port before they bind it: the
//! local stack, the benchmarks and the tests that start other programs.
//!
//! The kernel's `bind` to port 0 hands out a port from the same range it takes the
//! local ports of outgoing connections from (`ip_local_port_range`). Between choosing
//! a port that way and the program binding it, any connection opened on the machine
//! (Kafka's nodes talk to each other a lot while they start) may take it as its local
//! port, and the program then fails with "address in use". So ports are chosen below
//! that range, where no outgoing connection lands, and checked free by binding them.

use std::{
    collections::BTreeSet,
    io,
    net::{Ipv4Addr, TcpListener},
    sync::{Mutex, PoisonError},
};

/// The lowest port handed out: clear of the well-known and most registered ports.
const LOWEST: u16 = 20_000;

/// Where the kernel's range for outgoing connections starts (Linux's default if it
/// cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A loopback listener on a port below the range of outgoing connections, held until
/// dropped (hold several at once to get distinct ports). Falls back to a port the
/// kernel picks when that range is too small or full.
pub fn reserve_loopback_port() -> io::Result<TcpListener> {
    let end = ephemeral_start();
    if end > LOWEST + 1_000 {
        for _ in 0..200 {
            let port = rand::random_range(LOWEST..end);
            if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                return Ok(listener);
            }
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
}

/// A loopback port nobody listens on now, below the range of outgoing connections
/// (see the module's documentation), and never one this process handed out before:
/// two calls in a row (a stack choosing ports for the programs it is about to start)
/// would otherwise get the same port about once in 12,000 pairs. Another program may
/// still bind it first, so whoever uses it fails clearly when binding fails.
pub fn unused_loopback_port() -> io::Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    for _ in 0..100 {
        let port = reserve_loopback_port()?.local_addr()?.port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "every free loopback port tried was handed out by this process already",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_below_the_range_of_outgoing_connections() {
        let start = ephemeral_start();
        if start <= LOWEST + 1_000 {
            return;
        }
        let held: Vec<TcpListener> = (0..20).map(|_| reserve_loopback_port().unwrap()).collect();
        let mut ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert!(
            ports.iter().all(|p| (LOWEST..start).contains(p)),
            "{ports:?}"
        );
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 20, "held ports are distinct");
    }

    #[test]
    fn a_port_is_handed_out_once_per_process() {
        // Drawn at random from about 12,000 ports, 2,000 draws would repeat some
        // hundred times; handed out, none repeats.
        let mut ports: Vec<u16> = (0..2_000)
            .map(|_| unused_loopback_port().unwrap())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 2_000);
    }
}
