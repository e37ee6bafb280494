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
        let interrupt = Interrupt::install().expect("signal handlers");
        let log = dir.join("stack.log");
        let up = UpProcess::start(
            Path::new(env!("CARGO_BIN_EXE_xtask")),
            &[],
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
    /// A client of the stack's gateway that reads every status as an answer.
    pub fn of(stack: &Stack) -> Client {
        Client {
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .http_status_as_error(false)
                .build()
                .into(),
            gateway: stack.var("GATEWAY_URL").to_owned(),
        }
    }
}
