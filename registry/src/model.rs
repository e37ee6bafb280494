//! What the registry knows about an instance, independent of the API that told it.
//!
//! Both the native API and the Eureka API turn their requests into a
//! [`Registration`], and both render an [`Instance`] snapshot back out. Names are
//! case-insensitive: a [`ServiceName`] is stored lower-case and shown as Eureka shows
//! it (upper-case) only by the Eureka API.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};
use shared::FieldError;

/// A service's name, normalised to lower case (`ORDER-SERVICE` and `order-service` are
/// one service).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceName(String);

impl ServiceName {
    /// Letters, digits, `-`, `_` and `.`, 1 to 128 characters.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let valid = !raw.is_empty()
            && raw.len() <= 128
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if valid {
            Ok(Self(raw.to_ascii_lowercase()))
        } else {
            Err("must be 1 to 128 letters, digits, '-', '_' or '.'".into())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Eureka's spelling: upper case.
    pub fn eureka(&self) -> String {
        self.0.to_ascii_uppercase()
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An instance's status. The effective status is an operator's override when one is
/// set, else what the instance reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Starting,
    Up,
    Down,
    OutOfService,
    /// Finishing in-flight work before it leaves: no new requests.
    Draining,
    /// Eureka's "no override" marker and its value for statuses it does not know.
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "STARTING",
            Status::Up => "UP",
            Status::Down => "DOWN",
            Status::OutOfService => "OUT_OF_SERVICE",
            Status::Draining => "DRAINING",
            Status::Unknown => "UNKNOWN",
        }
    }

    /// The statuses a client may set (everything but `UNKNOWN`).
    pub const SETTABLE: &'static str = "STARTING, UP, DOWN, OUT_OF_SERVICE or DRAINING";
}

impl FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "STARTING" => Ok(Status::Starting),
            "UP" => Ok(Status::Up),
            "DOWN" => Ok(Status::Down),
            "OUT_OF_SERVICE" => Ok(Status::OutOfService),
            "DRAINING" => Ok(Status::Draining),
            "UNKNOWN" => Ok(Status::Unknown),
            _ => Err(format!("must be {}", Status::SETTABLE)),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated request to register (or re-register) an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub service: ServiceName,
    pub instance_id: String,
    /// Host name or IP address clients connect to.
    pub host: String,
    pub port: u16,
    pub status: Status,
    /// Requested lease length; the table clamps it to its configured bounds.
    pub lease_seconds: u32,
    pub health_url: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// What Eureka clients send and expect back; defaulted for native clients.
    pub eureka: EurekaDetails,
}

/// Fields only Eureka clients care about, kept so the Eureka API can echo them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EurekaDetails {
    pub ip_addr: Option<String>,
    pub secure_port: Option<u16>,
    pub secure_port_enabled: bool,
    pub vip_address: Option<String>,
    pub secure_vip_address: Option<String>,
    pub home_page_url: Option<String>,
    pub status_page_url: Option<String>,
    pub data_center_name: Option<String>,
    pub renewal_interval_secs: Option<u32>,
}

impl Registration {
    /// Checks fields that both APIs share; each error names its field.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        if self.instance_id.is_empty() || self.instance_id.len() > 256 {
            errors.push(FieldError::new("instanceId", "must be 1 to 256 characters"));
        } else if self.instance_id.chars().any(|c| c.is_control() || c == '/') {
            errors.push(FieldError::new(
                "instanceId",
                "must not contain '/' or control characters",
            ));
        }
        if !valid_host(&self.host) {
            errors.push(FieldError::new(
                "host",
                "must be an IP address or a DNS host name",
            ));
        }
        if self.port == 0 {
            errors.push(FieldError::new("port", "must be 1 to 65535"));
        }
        if self.status == Status::Unknown {
            errors.push(FieldError::new(
                "status",
                format!("must be {}", Status::SETTABLE),
            ));
        }
        if let Some(url) = &self.health_url
            && (!(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048)
        {
            errors.push(FieldError::new(
                "healthUrl",
                "must be an http:// or https:// URL",
            ));
        }
        // What Eureka clients send beside the shared fields is stored and served back
        // (and replicated to every peer): bounded like the rest.
        let eureka = &self.eureka;
        for (field, value, max) in [
            ("ipAddr", &eureka.ip_addr, 255),
            ("vipAddress", &eureka.vip_address, 1024),
            ("secureVipAddress", &eureka.secure_vip_address, 1024),
            ("homePageUrl", &eureka.home_page_url, 2048),
            ("statusPageUrl", &eureka.status_page_url, 2048),
            ("dataCenterInfo.name", &eureka.data_center_name, 255),
        ] {
            if value.as_ref().is_some_and(|v| v.len() > max) {
                errors.push(FieldError::new(
                    field,
                    format!("must be at most {max} characters"),
                ));
            }
        }
        if self.metadata.len() > 64 {
            errors.push(FieldError::new("metadata", "must have at most 64 entries"));
        }
        for (key, value) in &self.metadata {
            if key.is_empty() || key.len() > 128 || value.len() > 1024 {
                errors.push(FieldError::new(
                    format!("metadata.{key}"),
                    "keys must be 1 to 128 characters and values at most 1024",
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// `host:port`, bracketing IPv6 addresses.
    pub fn address(&self) -> String {
        format_address(&self.host, self.port)
    }
}

/// `host:port`, bracketing IPv6 addresses.
pub fn format_address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An IP address, or a DNS name of letters, digits and hyphens in dot-separated labels.
pub fn valid_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_case_insensitive() {
        assert_eq!(
            ServiceName::parse("ORDER-SERVICE"),
            ServiceName::parse("order-service")
        );
        assert_eq!(
            ServiceName::parse("Order-Service").map(|n| n.eureka()),
            Ok("ORDER-SERVICE".to_owned())
        );
        assert!(ServiceName::parse("a/b").is_err());
    }

    #[test]
    fn hosts_must_be_addresses_or_dns_names() {
        for ok in ["127.0.0.1", "::1", "order-1.internal", "localhost"] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in ["", "http://x", "a b", "-lead.example", "x:80", "a..b"] {
            assert!(!valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn statuses_parse_case_insensitively() {
        assert_eq!("draining".parse::<Status>(), Ok(Status::Draining));
        assert!("SLEEPING".parse::<Status>().is_err());
    }
}
