//! Our registry and gateway as the benchmarks run them: release binaries, a generated
//! registry token and signing key, the gateway's access log off (as nginx's is).

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context;
use serde_json::{Value, json};

use crate::{
    bench::wait_http_ok,
    procs::{Interrupt, Supervised},
};

/// A registry and a gateway routing by `routes` through it, and a user's token.
#[derive(Debug)]
pub struct Platform {
    pub registry: Supervised,
    pub gateway: Supervised,
    pub registry_port: u16,
    pub gateway_url: String,
    /// The registry's write token.
    pub token: String,
    /// A customer's bearer token, issued by the gateway.
    pub jwt: String,
}

impl Platform {
    /// Starts both from `bin` (`target/release`), their files under `dir`.
    pub fn start(
        bin: &Path,
        dir: &Path,
        routes: &Path,
        interrupt: &Interrupt,
    ) -> anyhow::Result<Self> {
        let registry_port = crate::free_port()?;
        let gateway_port = crate::free_port()?;
        let token = crate::random_token(32);
        let registry_url = format!("http://127.0.0.1:{registry_port}");
        let registry = Supervised::spawn(
            "registry",
            Command::new(bin.join("registry"))
                .env("REGISTRY_HTTP__PORT", registry_port.to_string())
                .env("REGISTRY_TOKEN", &token)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        wait_http_ok(
            &format!("{registry_url}/actuator/health"),
            Duration::from_secs(10),
            interrupt,
        )?;
        let gateway_config = dir.join("gateway.yaml");
        crate::stack::write_gateway_config(&gateway_config)?;
        let log = fs::File::create(dir.join("gateway.log"))?;
        let gateway = Supervised::spawn(
            "gateway",
            Command::new(bin.join("gateway"))
                .env("GATEWAY_CONFIG", &gateway_config)
                .env("GATEWAY_HTTP__PORT", gateway_port.to_string())
                .env("GATEWAY_ROUTES_FILE", routes)
                .env("REGISTRY_URL", &registry_url)
                .env("REGISTRY_TOKEN", &token)
                // No access log, as nginx's is off.
                .env("GATEWAY_LOG__LEVEL", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        let gateway_url = format!("http://127.0.0.1:{gateway_port}");
        wait_http_ok(
            &format!("{gateway_url}/actuator/health"),
            Duration::from_secs(10),
            interrupt,
        )?;
        let login: Value = agent()
            .post(&format!("{gateway_url}/auth/token"))
            .send_json(json!({"username": "sim-001", "password": crate::stack::SIM_PASSWORD}))?
            .body_mut()
            .read_json()?;
        let jwt = login["access_token"]
            .as_str()
            .context("the gateway issued no token")?
            .to_owned();
        Ok(Self {
            registry,
            gateway,
            registry_port,
            gateway_url,
            token,
            jwt,
        })
    }

    pub fn registry_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.registry_port)
    }

    /// The registry's Eureka API as a Spring client's `defaultZone`, credentials in it.
    pub fn eureka_zone(&self) -> String {
        format!(
            "http://eureka:{}@127.0.0.1:{}/eureka/",
            self.token, self.registry_port
        )
    }
}

/// An HTTP client for set-up calls: 10 s per call, statuses as values.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}
