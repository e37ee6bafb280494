//! The Spring Cloud programs under `interop/` as the benchmarks run them: `java -jar`
//! with the JVM's defaults and only the properties each job needs, as a Spring shop
//! would start them.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{
    bench::wait_http_ok,
    procs::{Interrupt, Supervised},
};

/// A running Spring program and how long it took to become ready.
#[derive(Debug)]
pub struct SpringProcess {
    pub child: Supervised,
    pub port: u16,
    /// From spawning the JVM to `/actuator/health` answering 200.
    pub ready_ms: f64,
}

impl SpringProcess {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Builds (if needed) and starts `interop/<program>` on `port` of the loopback with
/// `properties` (`name=value`), its output in `log`; returns once its health answers
/// 200. The properties go in `SPRING_APPLICATION_JSON`, not on the command line, so
/// credentials in them (a registry URL's password) stay out of the process list.
pub fn start(
    program: &str,
    port: u16,
    properties: &[String],
    log: &Path,
    interrupt: &Interrupt,
) -> anyhow::Result<SpringProcess> {
    let jar = crate::tools::spring_program(program, interrupt)?;
    let out = fs::File::create(log)?;
    let mut json = serde_json::Map::new();
    json.insert("server.port".into(), port.to_string().into());
    json.insert("server.address".into(), "127.0.0.1".into());
    for property in properties {
        let (name, value) = property
            .split_once('=')
            .with_context(|| format!("`{property}` is not name=value"))?;
        json.insert(name.to_owned(), value.into());
    }
    let mut command = Command::new(crate::broker::java_binary()?);
    command
        .arg("-jar")
        .arg(&jar)
        .env(
            "SPRING_APPLICATION_JSON",
            serde_json::Value::Object(json).to_string(),
        )
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let started = Instant::now();
    let child = Supervised::spawn(program, &mut command)?;
    wait_http_ok(
        &format!("http://127.0.0.1:{port}/actuator/health"),
        Duration::from_secs(180),
        interrupt,
    )?;
    Ok(SpringProcess {
        child,
        port,
        ready_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

/// The token check Spring Cloud Gateway does as an OAuth2 resource server: the
/// issuer's JWK set, the exact `iss`, an accepted `aud`.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    pub jwk_set_uri: String,
    pub issuer: String,
    pub audience: String,
}

impl TokenCheck {
    /// Our gateway's own tokens, with its default issuer and audience.
    pub fn of_gateway(gateway_url: &str) -> Self {
        Self {
            jwk_set_uri: format!("{gateway_url}/.well-known/jwks.json"),
            issuer: "storefront-gateway".into(),
            audience: "storefront".into(),
        }
    }
}

/// Properties for `interop/gateway`: Eureka at `zone` (read only: the gateway does
/// not register itself), one route `id` from `path` to `lb://<service>`, and the
/// token check.
pub fn gateway_properties(
    zone: &str,
    id: &str,
    service: &str,
    path: &str,
    tokens: &TokenCheck,
) -> Vec<String> {
    let route = "spring.cloud.gateway.server.webflux.routes[0]";
    vec![
        "spring.application.name=spring-gateway".into(),
        format!("eureka.client.service-url.defaultZone={zone}"),
        "eureka.client.register-with-eureka=false".into(),
        format!("{route}.id={id}"),
        format!("{route}.uri=lb://{service}"),
        format!("{route}.predicates[0]=Path={path}"),
        format!(
            "spring.security.oauth2.resourceserver.jwt.jwk-set-uri={}",
            tokens.jwk_set_uri
        ),
        format!(
            "spring.security.oauth2.resourceserver.jwt.audiences={}",
            tokens.audience
        ),
        format!("storefront.jwt.issuer={}", tokens.issuer),
    ]
}
