//! Which addresses a router may send traffic to.
//!
//! Whoever can register an instance can point a service's traffic, bearer tokens
//! included, at the address it registers. Service credentials limit *who* can register
//! a name (see the registry); [`InstanceNetworks`] limits *where* a router follows a
//! registration: only to addresses inside configured networks. An IP literal is checked
//! as it is; a host name is resolved (off the request path, when discovery sees the
//! instance, at most once per [`NAME_TTL`]) and is admitted only when every address it
//! resolves to is inside.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use ipnet::IpNet;

use crate::registry::ServiceInstance;

/// How long a host name's verdict is kept before it is resolved again.
pub const NAME_TTL: Duration = Duration::from_secs(30);

/// How long one resolution may take before the name is refused for now.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The networks a private deployment's instances live in: loopback, RFC 1918 and
/// RFC 6598 (shared address space, which some container platforms use) for IPv4;
/// loopback and unique local addresses (RFC 4193) for IPv6.
pub const PRIVATE_NETWORKS: [&str; 8] = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "::1/128",
    "fc00::/7",
    "::ffff:127.0.0.0/104",
];

/// Loopback only: the local stack's networks.
pub const LOOPBACK_NETWORKS: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// Parses `text` as a network (`10.0.0.0/8`) or a single address (`10.1.2.3`).
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!("`{text}` is not a network: write it as 10.0.0.0/8, fd00::/8 or one address")
    })
}

/// The networks instances must be in, and the verdicts on host names seen so far.
#[derive(Debug)]
pub struct InstanceNetworks {
    networks: Vec<IpNet>,
    names: Mutex<HashMap<String, Verdict>>,
}

/// A host name's verdict (the address it was pinned to) and when it was reached.
type Verdict = (Result<IpAddr, String>, Instant);

/// Why a name was not admitted: the resolver failed, or it answered outside.
enum Resolution {
    Failed(String),
    Outside(String),
}

/// `ip`, or the IPv4 address an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) carries.
pub fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` lies in one of `networks`, an IPv4-mapped address judged as IPv4.
pub fn any_contains(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = unmapped(ip);
    networks.iter().any(|n| n.contains(&ip))
}

/// The last `X-Forwarded-For` entry as written: the address the nearest proxy saw.
/// Earlier entries are whatever the client wrote.
pub fn last_forwarded_for(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .next_back()
        .map(str::trim)
}

/// `host` as an IP address, when it is one (IPv6 possibly in brackets).
pub fn literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// An instance a router will not send traffic to, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub instance: ServiceInstance,
    pub reason: String,
}

impl InstanceNetworks {
    /// Parses each of `networks`; the error names the one that is not a network.
    pub fn parse<S: AsRef<str>>(networks: &[S]) -> Result<Self, String> {
        let networks = networks
            .iter()
            .map(|n| parse_network(n.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if networks.is_empty() {
            return Err("name at least one network (127.0.0.0/8 for loopback only)".into());
        }
        Ok(Self {
            networks,
            names: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `ip` is inside one of the networks. An IPv4-mapped IPv6 address is
    /// judged as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        any_contains(&self.networks, ip)
    }

    /// Splits `instances` into those inside the networks and those refused. An
    /// instance registered by host name is admitted with its `address` pinned to the
    /// checked IP (its `host` keeps the name, for the `Host` header), so the connection
    /// goes where the check looked: a name whose DNS answer changes after the check
    /// cannot steer traffic elsewhere. Names are resolved concurrently.
    pub async fn admit(
        &self,
        instances: Vec<ServiceInstance>,
    ) -> (Vec<ServiceInstance>, Vec<Refused>) {
        let now = Instant::now();
        let mut due: Vec<(String, u16)> = instances
            .iter()
            .filter(|i| literal(&i.host).is_none())
            .filter(|i| {
                self.lock()
                    .get(&i.host)
                    .is_none_or(|(_, at)| now.duration_since(*at) >= NAME_TTL)
            })
            .map(|i| (i.host.clone(), i.port))
            .collect();
        due.sort();
        due.dedup_by(|a, b| a.0 == b.0);
        let resolved = futures::future::join_all(
            due.iter()
                .map(|(host, port)| async move { (host, self.resolve(host, *port).await) }),
        )
        .await;
        {
            let mut names = self.lock();
            // Bounded: verdicts far past their time are dropped before new ones are kept.
            names.retain(|_, (_, at)| now.duration_since(*at) < NAME_TTL * 4);
            for (host, verdict) in resolved {
                match verdict {
                    // A resolver that fails keeps the last good answer in force for a
                    // while: a DNS hiccup must not take every instance away.
                    Err(Resolution::Failed(_))
                        if names.get(host.as_str()).is_some_and(|(v, _)| v.is_ok()) => {}
                    Err(Resolution::Failed(reason) | Resolution::Outside(reason)) => {
                        names.insert(host.clone(), (Err(reason), now));
                    }
                    Ok(ip) => {
                        names.insert(host.clone(), (Ok(ip), now));
                    }
                }
            }
        }
        let mut admitted = Vec::with_capacity(instances.len());
        let mut refused = Vec::new();
        for mut instance in instances {
            let verdict = match literal(&instance.host) {
                Some(ip) if self.contains(ip) => Ok(None),
                Some(ip) => Err(format!("{ip} is outside the allowed instance networks")),
                None => match self.lock().get(&instance.host) {
                    Some((Ok(ip), _)) => Ok(Some(*ip)),
                    Some((Err(reason), _)) => Err(reason.clone()),
                    None => Err(format!("{} was not resolved", instance.host)),
                },
            };
            match verdict {
                Ok(pinned) => {
                    if let Some(ip) = pinned {
                        instance.address = std::net::SocketAddr::new(ip, instance.port).to_string();
                    }
                    admitted.push(instance);
                }
                Err(reason) => refused.push(Refused { instance, reason }),
            }
        }
        (admitted, refused)
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<IpAddr, Resolution> {
        let lookup = tokio::net::lookup_host((host, port));
        let addresses: Vec<IpAddr> = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
            Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
            Ok(Err(e)) => return Err(Resolution::Failed(format!("{host} does not resolve ({e})"))),
            Err(_) => {
                return Err(Resolution::Failed(format!(
                    "{host} did not resolve within {RESOLVE_TIMEOUT:?}"
                )));
            }
        };
        if let Some(outside) = addresses.iter().find(|ip| !self.contains(**ip)) {
            return Err(Resolution::Outside(format!(
                "{host} resolves to {outside}, outside the allowed instance networks"
            )));
        }
        addresses
            .first()
            .copied()
            .ok_or_else(|| Resolution::Failed(format!("{host} resolves to no address")))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Verdict>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(host: &str) -> ServiceInstance {
        ServiceInstance {
            service: "orders".into(),
            instance_id: host.into(),
            host: host.into(),
            port: 8080,
            address: format!("{host}:8080"),
            status: "UP".into(),
            metadata: Default::default(),
            secure_port: None,
        }
    }

    #[test]
    fn networks_parse_with_or_without_a_prefix_and_nonsense_is_named() {
        let nets = InstanceNetworks::parse(&["10.0.0.0/8", "192.168.1.7", "fd00::/8"]).unwrap();
        assert!(nets.contains("10.200.0.1".parse().unwrap()));
        assert!(nets.contains("192.168.1.7".parse().unwrap()));
        assert!(!nets.contains("192.168.1.8".parse().unwrap()));
        assert!(nets.contains("fd12::1".parse().unwrap()));
        assert!(
            nets.contains("::ffff:10.1.1.1".parse().unwrap()),
            "v4-mapped"
        );
        let error = InstanceNetworks::parse(&["10.0.0.0/8", "office"]).unwrap_err();
        assert!(error.contains("`office`"), "{error}");
        assert!(InstanceNetworks::parse::<&str>(&[]).is_err());
    }

    #[test]
    fn the_private_default_leaves_public_addresses_out() {
        let nets = InstanceNetworks::parse(&PRIVATE_NETWORKS).unwrap();
        for inside in ["127.0.0.1", "10.1.2.3", "172.20.0.5", "192.168.0.9", "::1"] {
            assert!(nets.contains(inside.parse().unwrap()), "{inside}");
        }
        for outside in [
            "8.8.8.8",
            "192.0.2.10",
            "172.32.0.1",
            "2001:db8::1",
            "0.0.0.0",
        ] {
            assert!(!nets.contains(outside.parse().unwrap()), "{outside}");
        }
    }

    #[tokio::test]
    async fn literals_are_judged_as_they_are_and_names_by_what_they_resolve_to() {
        let loopback = InstanceNetworks::parse(&LOOPBACK_NETWORKS).unwrap();
        let (admitted, refused) = loopback
            .admit(vec![
                instance("127.0.0.1"),
                instance("[::1]"),
                instance("localhost"),
                instance("10.0.0.1"),
                instance("no-such-host.invalid"),
            ])
            .await;
        let hosts: Vec<&str> = admitted.iter().map(|i| i.host.as_str()).collect();
        assert_eq!(hosts, ["127.0.0.1", "[::1]", "localhost"]);
        // The name is pinned to the address that was checked.
        let pinned: std::net::SocketAddr = admitted[2].address.parse().expect("an IP address");
        assert!(
            pinned.ip().is_loopback() && pinned.port() == 8080,
            "{pinned}"
        );
        assert_eq!(
            admitted[0].address, "127.0.0.1:8080",
            "literals stay as registered"
        );
        assert_eq!(refused.len(), 2);
        assert!(
            refused[0].reason.contains("10.0.0.1 is outside"),
            "{refused:?}"
        );
        assert!(
            refused[1].reason.contains("no-such-host.invalid"),
            "{refused:?}"
        );

        let elsewhere = InstanceNetworks::parse(&["10.0.0.0/8"]).unwrap();
        let (admitted, refused) = elsewhere.admit(vec![instance("localhost")]).await;
        assert!(admitted.is_empty());
        assert!(refused[0].reason.contains("outside"), "{refused:?}");
    }
}
