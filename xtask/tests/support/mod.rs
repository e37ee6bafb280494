//! What the tests that run the whole local stack share: the stack itself and a client
//! that talks to it through the gateway.

#![allow(dead_code)]

use std::{path::Path, time::Duration};

use serde_json::{Value, json};
use xtask::{procs::Interrupt, stack::UpProcess};

/// The stack (`xtask up` with its own database and broker: nothing shared with the
/// other tests), stopped (SIGINT, as Ctrl-C) when dropped.
pub struct Stack(UpProcess);

impl Stack {
    pub fn start(dir: &Path) -> Stack {
        Self::start_with(dir, &[])
    }

    /// The stack started with `xtask up`'s further `args`.
    pub fn start_with(dir: &Path, args: &[&str]) -> Stack {
        let interrupt = Interrupt::install().expect("signal handlers");
        let log = dir.join("stack.log");
        let up = UpProcess::start(
            Path::new(env!("CARGO_BIN_EXE_xtask")),
            args,
            &dir.join("stack.env"),
            &log,
            &interrupt,
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Stack(up)
    }

    pub fn var(&self, key: &str) -> &str {
        self.0.var(key).expect("a variable of stack.env")
    }
}

pub struct Client {
    pub agent: ureq::Agent,
    pub gateway: String,
}

impl Client {
    pub fn login(&self, user: &str) -> String {
        let (status, body) = self.send(
            "POST",
            "/auth/token",
            None,
            Some(json!({"username": user, "password": user})),
            &[],
        );
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().expect("a token").to_owned()
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.gateway);
        let mut response = match (method, body) {
            ("GET", _) => {
                let mut request = self.agent.get(&url);
                if let Some(token) = token {
                    request = request.header("authorization", &format!("Bearer {token}"));
                }
                request.call()
            }
            (_, body) => {
                let mut request = self.agent.post(&url);
                if let Some(token) = token {
                    request = request.header("authorization", &format!("Bearer {token}"));
                }
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                request.send_json(body.unwrap_or(Value::Null))
            }
        }
        .expect("the gateway answers");
        let status = response.status().as_u16();
        let body = response.body_mut().read_json().unwrap_or(Value::Null);
        (status, body)
    }
}

impl Client {
    /// A client of the stack's gateway that reads every status as an answer (and
    /// trusts the stack's CA when it runs with `--tls`).
    pub fn of(stack: &Stack) -> Client {
        let ca = stack.0.var("STOREFRONT_CA_FILE").ok().map(Path::new);
        Client {
            agent: agent(ca),
            gateway: stack.var("GATEWAY_URL").to_owned(),
        }
    }
}

/// An HTTP client that reads every status as an answer, trusting only `ca` (PEM)
/// when given.
pub fn agent(ca: Option<&Path>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false);
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).expect("the stack's CA file");
        let certificate = ureq::tls::Certificate::from_pem(&pem)
            .expect("a PEM certificate")
            .to_owned();
        config = config.tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&[certificate]))
                .build(),
        );
    }
    config.build().into()
}
