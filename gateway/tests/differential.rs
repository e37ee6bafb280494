//! A differential test against the gateway we mimic. One routes file
//! (`differential/routes.yml`, in Spring Cloud Gateway's own `application.yml` form,
//! using every predicate and filter we support in both spellings) is loaded unchanged
//! by our gateway, in-process, and by the real Spring Cloud Gateway
//! (`interop/gateway`: Spring Cloud Gateway Server WebFlux with Spring Security's OAuth2
//! resource server checking our tokens against our JWK set), both in front of one
//! recording upstream. Every case of the table goes to both; the test compares what the
//! client got (status, headers, body) and what the upstream saw (every attempt's
//! method, path, raw query, headers and body), and fails once, at the end, listing
//! every difference of every case.
//!
//! Differences that say nothing about routing are not compared: each gateway's own
//! observability headers, Spring Security's default response headers, per-hop framing
//! (see the lists below, each entry with its reason). Deliberate behaviours of ours
//! that some case exercises on purpose are named by that case with their reason, and
//! reported rather than failed.
//!
//! Run by `cargo xtask test`, which builds the Spring jar (`STOREFRONT_SPRING_GATEWAY`)
//! and runs the Redis Spring's `RequestRateLimiter` keeps its buckets in
//! (`STOREFRONT_REDIS_URL`).

mod support;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    response::Response,
};
use http_body_util::BodyExt;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// The routes both gateways load; `{{UPSTREAM}}`, `{{CLOSED}}` and `{{RUN}}` are
/// filled in.
const ROUTES: &str = include_str!("differential/routes.yml");

/// How long Spring Cloud Gateway may take to start: a cold JVM on a busy two-core
/// machine, as CI has.
const SPRING_START_DEADLINE: Duration = Duration::from_secs(180);

/// How long one request (or the rest of its body) may take at either gateway. The
/// slowest case waits 1.5 s for its upstream.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// The `Host` every case sends unless it names its own: a fixed name rather than each
/// gateway's own address, so that `X-Forwarded-Host`, `PreserveHostHeader` and
/// rewritten `Location`s do not differ by the two gateways' ports.
const DEFAULT_HOST: &str = "gateway.test";

/// The request header that tags every request with its case and side, so that the
/// upstream's records are told apart.
const CASE_TAG: &str = "x-case";

/// Request headers by which a case tells the upstream how to answer. To the gateways
/// they are ordinary headers, forwarded (and recorded) like any other.
///
/// `x-respond-status: 500,503,200`: the status of each attempt in turn (retries), the
/// last one for any further attempt.
const RESPOND_STATUS: &str = "x-respond-status";
/// `x-respond-header: Name: value`, repeatable: headers the upstream answers with.
const RESPOND_HEADER: &str = "x-respond-header";
/// `x-respond-delay-ms: 1500`: how long the upstream waits before answering.
const RESPOND_DELAY: &str = "x-respond-delay-ms";

/// Request headers the upstream sees that the two gateways are expected to write
/// differently, and why; everything else the upstream sees is compared.
const UPSTREAM_IGNORED: &[&str] = &[
    // The test's own tag, different by design (it names the side).
    CASE_TAG,
    // Ours sets a request id and starts a W3C trace for every request; the Spring build
    // has no tracer on its classpath, and sets neither.
    "x-request-id",
    "traceparent",
    // With trusted proxies configured Spring also writes RFC 7239 `Forwarded`
    // (ForwardedHeadersFilter), `X-Forwarded-Port` and, after a path was shortened,
    // `X-Forwarded-Prefix` (XForwardedHeadersFilter); ours writes none of them, only
    // `X-Forwarded-For`, `-Proto` and `-Host`, which are compared.
    "forwarded",
    "x-forwarded-port",
    "x-forwarded-prefix",
    // Framing and connection management belong to each hop: Reactor Netty and hyper
    // choose differently between `Content-Length`, chunking and keep-alive. The body
    // itself is compared.
    "content-length",
    "transfer-encoding",
    "connection",
];

/// Response headers the client gets that the two gateways are expected to write
/// differently, and why; everything else is compared when the upstream answered.
const RESPONSE_IGNORED: &[&str] = &[
    // Per hop, as above; `Date` is the moment each answer passed.
    "date",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    // Ours returns the request id to the client.
    "x-request-id",
    // Spring Security's default cache headers, written on every response whose
    // upstream set none of the three. No case uses them.
    "cache-control",
    "pragma",
    "expires",
];

/// Spring Security's other default response headers, written where a response has
/// none. Compared only on routes with `SecureHeaders`, where both gateways are meant to
/// write them (and where Spring's SecureHeaders filter writes them first).
const SPRING_SECURITY_DEFAULTS: &[&str] = &[
    "x-content-type-options",
    "x-frame-options",
    "x-xss-protection",
    "referrer-policy",
    "strict-transport-security",
];

/// Headers whose value is a list that the two gateways join with different separators
/// (Spring `a,b`, ours `a, b`): compared as their items.
const LIST_VALUED: &[&str] = &["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];

// Reasons for the deliberate differences some cases name.

const FIREWALL: &str = "Spring Security's StrictServerWebExchangeFirewall (WebFilterChainProxy's default) \
    refuses an encoded slash or percent, `;`, `//` and `..` with 400 before any route; ours routes the path as sent";
const TRUSTED_CHAIN: &str = "Spring keeps only the X-Forwarded-For entries its trusted-proxies regex matches \
    (XForwardedHeadersFilter.write), dropping the client's; ours extends a trusted proxy's chain as it came";
const RATELIMIT_HEADERS: &str = "ours also writes the IETF draft's RateLimit-Limit, -Remaining and -Reset \
    beside Spring's X-RateLimit-* (docs/gateway.md, Limits); Spring writes only its own";
const RATELIMIT_HEADERS_AND_WHOLE_SECONDS: &str = "ours also writes the IETF draft's RateLimit-* \
    headers; and Spring's Redis script refills in whole seconds of Redis's clock, ours \
    continuously: when a second turns between the two requests Spring's bucket holds one token more";
const SECURE_HEADERS: &str = "ours writes `X-XSS-Protection: 0` (the current advice) and no Content-Security-Policy \
    (docs/gateway.md); Spring writes `1 ; mode=block` and a CSP for HTML pages (SecureHeadersProperties)";
const IDENTITY: &str = "ours drops identity headers a client could forge (X-User-Id, X-User-Roles...; \
    docs/gateway.md, Authentication); Spring passes them on";
const CORS: &str = "ours owns CORS and drops an upstream's Access-Control-* headers (docs/gateway.md, Limits); \
    Spring passes them on";
const UNREACHABLE: &str = "ours answers 502 when the upstream cannot be reached; Spring lets the connect \
    exception reach its error handler, which answers 500";
const AUTH_FIRST: &str = "Spring Security authenticates before Spring routes, so a request without a token \
    is 401 wherever it goes; ours finds the route first and answers 404 when there is none (docs/gateway.md)";
const DEFAULT_RETRIES: &str = "ours retries a GET answered 502/503/504 twice even without a Retry filter \
    (docs/gateway.md, Failures); Spring retries only with one";
const TIME_LIMITER: &str = "Spring's Resilience4J breaker runs under a 1 s time limiter by default and sends \
    a slower call to the fallback; ours has no time limiter and waits for the route's response timeout";

const HOST_CASE: &str = "host names are case-insensitive (RFC 9110 §4.2.3) and ours compares them so; \
    Spring's AntPathMatcher compares them case-sensitively";
const FALLBACK_FORWARDED: &str = "ours sends a fallback's request with the X-Forwarded-Host and -Proto of \
    any routed request; Spring's forward: leaves them off (and keeps X-Forwarded-For)";

/// Header values by lower-case name, each name's values in the order they came.
type Headers = BTreeMap<String, Vec<String>>;

fn headers_of(map: &HeaderMap) -> Headers {
    let mut headers = Headers::new();
    for (name, value) in map {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    headers
}

// ---- The recording upstream ----------------------------------------------------------

/// What the upstream saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    path: String,
    /// The raw query as sent; `None` without a `?`.
    query: Option<String>,
    headers: Headers,
    body: String,
}

/// Every request the upstream saw, by tag, in the order they came.
#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<HashMap<String, Vec<Seen>>>>);

impl Recorder {
    /// The requests tagged `tag`, forgotten here.
    fn take(&self, tag: &str) -> Vec<Seen> {
        self.0
            .lock()
            .expect("recorder")
            .remove(tag)
            .unwrap_or_default()
    }
}

/// An upstream on a free port of the loopback that records every request and answers
/// as the request's `x-respond-*` headers say.
async fn recording_upstream() -> (SocketAddr, Recorder) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let recorder = Recorder::default();
    let app = Router::new().fallback(answer).with_state(recorder.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, recorder)
}

async fn answer(State(recorder): State<Recorder>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let headers = headers_of(&parts.headers);
    let first = |name: &str| headers.get(name).and_then(|v| v.first()).cloned();
    let tag = first(CASE_TAG).unwrap_or_else(|| "untagged".into());
    let attempt = {
        let mut seen = recorder.0.lock().expect("recorder");
        let attempts = seen.entry(tag).or_default();
        attempts.push(Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: headers.clone(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        attempts.len() - 1
    };
    let status = first(RESPOND_STATUS)
        .and_then(|list| {
            let statuses: Vec<&str> = list.split(',').map(str::trim).collect();
            let status = statuses.get(attempt).or(statuses.last())?;
            StatusCode::from_bytes(status.as_bytes()).ok()
        })
        .unwrap_or(StatusCode::OK);
    if let Some(delay) = first(RESPOND_DELAY).and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut response = Response::new(Body::from("answered by the recording upstream\n"));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    for line in headers.get(RESPOND_HEADER).into_iter().flatten() {
        let parsed = line.split_once(':').and_then(|(name, value)| {
            Some((
                HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                HeaderValue::from_str(value.trim()).ok()?,
            ))
        });
        if let Some((name, value)) = parsed {
            response.headers_mut().append(name, value);
        }
    }
    response
}

// ---- The cases -----------------------------------------------------------------------

/// Which `Authorization` a case sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// `alice`'s bearer token, valid at both gateways.
    Alice,
    Missing,
    /// `Bearer` and something that is no JWT.
    Invalid,
}

/// What a case means to show, as Spring Cloud Gateway behaves. Checked on both sides,
/// and reported only when both miss it: then the case no longer tests what it says
/// (a route that never matches passes as "the same 404 on both sides").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A route matches and the client gets the upstream's answer (edited, or the
    /// fallback's).
    Upstream,
    /// No route matches: 404, and the upstream sees nothing.
    NoRoute,
    /// The gateway answers this status itself (a redirect, a limit, a timeout...).
    Answered(u16),
}

impl Expect {
    /// How `observed` misses this expectation, if it does.
    fn unmet(self, observed: &Observed) -> Option<String> {
        let status = observed.answer.status;
        let reached = !observed.seen.is_empty();
        match self {
            Expect::Upstream if !reached => Some(format!("{status}; the upstream saw nothing")),
            Expect::NoRoute if status != 404 || reached => Some(format!(
                "{status}{}",
                if reached { "; the upstream saw it" } else { "" }
            )),
            Expect::Answered(expected) if status != expected => Some(status.to_string()),
            _ => None,
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Upstream => write!(f, "the upstream's answer"),
            Expect::NoRoute => write!(f, "404 from no route"),
            Expect::Answered(status) => write!(f, "the gateway's own {status}"),
        }
    }
}

/// A difference a case exists to show: the subjects it covers (prefixes of a
/// [`Difference`]'s subject) and why the gateways differ there.
#[derive(Debug, Clone, Copy)]
struct Known {
    subjects: &'static [&'static str],
    why: &'static str,
}

impl Known {
    fn covers(&self, difference: &Difference) -> bool {
        self.subjects
            .iter()
            .any(|subject| difference.subject.starts_with(subject))
    }
}

/// One request, sent alike to both gateways.
#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    method: &'static str,
    /// The request target, path and query, byte for byte as sent.
    target: &'static str,
    /// Besides those every request carries (see [`send`]); a name given twice is sent
    /// as two lines.
    headers: Vec<(&'static str, String)>,
    body: String,
    token: Token,
    expect: Expect,
    /// Whether the route adds `SecureHeaders`, whose headers are then compared.
    secure_headers: bool,
    known: Option<Known>,
}

impl Case {
    fn new(method: &'static str, name: &'static str, target: &'static str) -> Self {
        Self {
            name,
            method,
            target,
            headers: Vec::new(),
            body: String::new(),
            token: Token::Alice,
            expect: Expect::Upstream,
            secure_headers: false,
            known: None,
        }
    }

    fn get(name: &'static str, target: &'static str) -> Self {
        Self::new("GET", name, target)
    }

    fn with_body(
        method: &'static str,
        name: &'static str,
        target: &'static str,
        body: impl Into<String>,
    ) -> Self {
        Self {
            body: body.into(),
            ..Self::new(method, name, target)
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn host(self, host: &'static str) -> Self {
        self.header("host", host)
    }

    fn upstream_status(self, statuses: &'static str) -> Self {
        self.header(RESPOND_STATUS, statuses)
    }

    fn upstream_header(self, line: &'static str) -> Self {
        self.header(RESPOND_HEADER, line)
    }

    fn upstream_delay_ms(self, ms: u64) -> Self {
        self.header(RESPOND_DELAY, ms.to_string())
    }

    fn token(mut self, token: Token) -> Self {
        self.token = token;
        self
    }

    fn no_route(mut self) -> Self {
        self.expect = Expect::NoRoute;
        self
    }

    fn answered(mut self, status: u16) -> Self {
        self.expect = Expect::Answered(status);
        self
    }

    fn secure_headers(mut self) -> Self {
        self.secure_headers = true;
        self
    }

    fn known(mut self, subjects: &'static [&'static str], why: &'static str) -> Self {
        self.known = Some(Known { subjects, why });
        self
    }
}

/// The table. Each group exercises one predicate or filter of `routes.yml`: matching
/// and not, in both spellings, and at its edges. Expectations are Spring's behaviour.
fn cases() -> Vec<Case> {
    let get = Case::get;
    vec![
        // ---- Path ----
        get("Path: an exact pattern", "/path/exact"),
        // Spring 7's PathPattern has no optional trailing slash any more.
        get(
            "Path: an exact pattern and a trailing slash",
            "/path/exact/",
        )
        .no_route(),
        get("Path: `/**` and no further segment", "/path/wild"),
        get("Path: `/**` and several segments", "/path/wild/a/b/c"),
        get("Path: `*` and one segment", "/path/one/x/end"),
        get("Path: `*` and two segments", "/path/one/x/y/end").no_route(),
        get("Path: a longer first segment", "/pathology").no_route(),
        get("Path (expanded): the first pattern", "/paths/a/1/2"),
        get(
            "Path (expanded): the second, with a variable",
            "/paths/b/leaf",
        ),
        // Spring matches segments decoded, and forwards the path as sent.
        get(
            "Path: a percent-encoded letter in a literal segment",
            "/p%61th/exact",
        ),
        get("Path: an encoded space", "/path/wild/a%20b"),
        get("Path: encoded UTF-8", "/path/wild/caf%C3%A9"),
        get("Path: a plus sign", "/path/wild/a+b"),
        get("Path: an encoded slash", "/path/wild/a%2Fb")
            .answered(400)
            .known(&["status", "upstream"], FIREWALL),
        get("Path: an empty segment", "/path/wild//b")
            .answered(400)
            .known(&["status", "upstream"], FIREWALL),
        get("Path: a dot-dot segment", "/path/wild/../exact")
            .answered(400)
            .known(&["status", "upstream"], FIREWALL),
        get("Path: a semicolon", "/path/wild/a;b=c")
            .answered(400)
            .known(&["status", "upstream"], FIREWALL),
        get("Path: an encoded percent", "/path/wild/100%25")
            .answered(400)
            .known(&["status", "upstream"], FIREWALL),
        // ---- Method ----
        get("Method: GET, listed", "/method/x"),
        Case::with_body(
            "POST",
            "Method: POST, listed, its body passed on",
            "/method/x",
            r#"{"order":1}"#,
        )
        .header("content-type", "application/json"),
        Case::with_body("PUT", "Method: PUT, not listed", "/method/x", "x").no_route(),
        Case::new("HEAD", "Method: HEAD is not GET", "/method/x").no_route(),
        Case::with_body("PATCH", "Method (expanded): PATCH", "/methods/x", "patch"),
        Case::new("DELETE", "Method (expanded): DELETE", "/methods/x"),
        get("Method (expanded): GET, not listed", "/methods/x").no_route(),
        // ---- Header ----
        get("Header: a value that matches", "/header/x").header("x-env", "prod"),
        get("Header: a value that does not", "/header/x")
            .header("x-env", "dev")
            .no_route(),
        get("Header: absent", "/header/x").no_route(),
        get("Header: the second of two lines matches", "/header/x")
            .header("x-env", "dev")
            .header("x-env", "stage"),
        // Spring splits each line at commas (HttpHeaders.getValuesAsList).
        get("Header: one line with two values", "/header/x").header("x-env", "dev, stage"),
        get("Header (expanded): present", "/headers/x").header("x-present", "yes"),
        get("Header (expanded): present but empty", "/headers/x")
            .header("x-present", "")
            .no_route(),
        get("Header (expanded): absent", "/headers/x").no_route(),
        // ---- Host ----
        get("Host: under a `**.` pattern", "/host/x").host("shop.eu.example.org"),
        // Spring's AntPathMatcher lets `**` stand for no label at all.
        get("Host: the domain of a `**.` pattern itself", "/host/x").host("example.org"),
        get("Host: an exact pattern", "/host/x").host("api.example.com"),
        // Spring matches the whole Host header, port included, case-sensitively.
        get("Host: with a port", "/host/x")
            .host("api.example.com:8443")
            .no_route(),
        get("Host: in capitals", "/host/x")
            .host("API.EXAMPLE.COM")
            .no_route()
            .known(&["status", "upstream"], HOST_CASE),
        get("Host: another domain", "/host/x")
            .host("example.net")
            .no_route(),
        get("Host (expanded)", "/hosts/x").host("static.example.net"),
        get(
            "Host: a template variable, used by later filters",
            "/host-var/abc",
        )
        .host("acme.shop.example.org"),
        get("Host: a template variable is one whole label", "/host-var/abc")
            .host("shop.example.org")
            .no_route(),
        get("Host: a template variable is one label only", "/host-var/abc")
            .host("a.b.shop.example.org")
            .no_route(),
        // Both predicates capture `name`: the later one's value wins.
        get("Host: its variable over the Path's of that name", "/host-over/path")
            .host("host.example.net"),
        // ---- Query ----
        get("Query: a value that matches", "/query/x?lang=en"),
        get("Query: a value that does not", "/query/x?lang=fr").no_route(),
        get(
            "Query: the second of two values matches",
            "/query/x?lang=fr&lang=de",
        ),
        // Spring matches query values decoded.
        get("Query: a percent-encoded value", "/query/x?lang=%65n"),
        get("Query: absent", "/query/x?language=en").no_route(),
        get(
            "Query (expanded): a flag without a value",
            "/queries/x?debug",
        ),
        get(
            "Query (expanded): an empty value among others",
            "/queries/x?a=1&debug=&b=2",
        ),
        get(
            "Query (expanded): names are case-sensitive",
            "/queries/x?Debug=1",
        )
        .no_route(),
        // ---- After, Before, Between ----
        get("After: an instant in the past", "/after/x"),
        get("Before: an instant in the past", "/before/x").no_route(),
        get("Between (expanded): now is inside", "/between/x"),
        // ---- Cookie ----
        get("Cookie: a value that matches", "/cookie/x").header("cookie", "flavour=chip"),
        get("Cookie: among other cookies", "/cookie/x").header("cookie", "a=1; flavour=chop; b=2"),
        get("Cookie: a value that does not", "/cookie/x")
            .header("cookie", "flavour=chocolate")
            .no_route(),
        get("Cookie: in a second Cookie line", "/cookie/x")
            .header("cookie", "a=1")
            .header("cookie", "flavour=chip"),
        get("Cookie (expanded): a value that matches", "/cookies/x")
            .header("cookie", "session=deadbeef"),
        get("Cookie (expanded): a value that does not", "/cookies/x")
            .header("cookie", "session=DEADBEEF")
            .no_route(),
        // ---- RemoteAddr, XForwardedRemoteAddr ----
        get("RemoteAddr: the client's loopback address", "/remote/x"),
        get(
            "RemoteAddr (expanded): whatever X-Forwarded-For says",
            "/remote-miss/x",
        )
        .header("x-forwarded-for", "10.1.2.3")
        .no_route(),
        get("XForwardedRemoteAddr: the nearest proxy's entry", "/xff/x")
            .header("x-forwarded-for", "10.1.2.3")
            .known(&["upstream #1 header x-forwarded-for"], TRUSTED_CHAIN),
        get(
            "XForwardedRemoteAddr: an earlier entry does not count",
            "/xff/x",
        )
        .header("x-forwarded-for", "10.1.2.3, 192.168.1.1")
        .no_route(),
        // Spring discards X-Forwarded-For sent in several lines and falls back to the
        // peer (XForwardedRemoteAddressResolver).
        get("XForwardedRemoteAddr: two X-Forwarded-For lines", "/xff/x")
            .header("x-forwarded-for", "192.168.1.1")
            .header("x-forwarded-for", "10.1.2.3")
            .no_route(),
        get(
            "XForwardedRemoteAddr: none, so the peer's address",
            "/xff/x",
        )
        .no_route(),
        // ---- Weight ----
        get("Weight: a route of weight 0 gets nothing", "/weight/x"),
        // ---- Authentication, and no route ----
        get("No token", "/method/x")
            .token(Token::Missing)
            .answered(401),
        get("A bearer that is no token", "/method/x")
            .token(Token::Invalid)
            .answered(401),
        get("No route, with a token", "/nowhere").no_route(),
        get("No route, and no token", "/nowhere")
            .token(Token::Missing)
            .answered(401)
            .known(&["status"], AUTH_FIRST),
        // ---- Request headers ----
        get(
            "AddRequestHeader: a path variable, a comma, after the client's lines",
            "/arh/abc",
        )
        .header("x-multi", "client")
        .header("x-commas", "client"),
        get("A shortcut's empty argument is dropped", "/gap/x"),
        get(
            "AddRequestHeader: an encoded path variable, decoded",
            "/arh/a%20b",
        ),
        get("SetRequestHeader: replaces every line", "/srh/x")
            .header("x-mode", "a")
            .header("x-mode", "b"),
        get(
            "RemoveRequestHeader: every line, in both spellings",
            "/rmrh/x",
        )
        .header("x-secret", "1")
        .header("x-secret", "2")
        .header("cookie", "a=1")
        .header("x-kept", "yes"),
        // Spring gathers the values of a name given twice (X-Size: m and l).
        get(
            "AddRequestHeadersIfNotPresent: what is absent, a name given twice",
            "/aif/x",
        )
        .header("x-colour", "red"),
        get(
            "AddRequestHeadersIfNotPresent: a blank value counts as absent",
            "/aif/x",
        )
        .header("x-colour", "")
        .header("x-size", "s"),
        get(
            "MapRequestHeader: every line, after the target's own",
            "/map/x",
        )
        .header("x-tenant", "a")
        .header("x-tenant", "b")
        .header("x-tenant-id", "old")
        .header("x-region", "eu"),
        get("MapRequestHeader: nothing to copy", "/map/x"),
        get("PreserveHostHeader: the client's Host", "/preserve/x"),
        // The client's own Host, not the forwarded chain built from it.
        get("PreserveHostHeader: behind a trusted proxy", "/preserve/x")
            .header("x-forwarded-host", "shop.example.org"),
        get(
            "No PreserveHostHeader: the upstream's own Host",
            "/path/wild/host",
        ),
        get("SetRequestHostHeader (expanded)", "/sethost/x"),
        // ---- Path and query ----
        get(
            "StripPrefix: two segments, the query as sent",
            "/strip/a/b/c?x=1&y=&z=%20",
        ),
        get("StripPrefix: a trailing slash", "/strip/a/b/"),
        get("StripPrefix: nothing left", "/strip/a"),
        get("StripPrefix (expanded)", "/stripx/one/two"),
        get("PrefixPath", "/pfx/items?page=2"),
        get("RewritePath: a named group, the query kept", "/rw/a/b?q=1"),
        get("RewritePath: an empty group", "/rw/"),
        get(
            "RewritePath (expanded): every match replaced",
            "/dash/a-b-c",
        ),
        get(
            "SetPath: a path variable, the query kept",
            "/sp/42/items?x=1",
        ),
        get("SetPath: an encoded variable", "/sp/a%20b/items"),
        // Ours refuses to place it; Spring's firewall refuses the encoded dots first.
        get("SetPath: an encoded `..` variable", "/sp/%2E%2E/items").answered(400),
        get("AddRequestParameter: no query before", "/arp/bob"),
        get(
            "AddRequestParameter: after the client's parameters",
            "/arp/bob?a=1&a=2&b=",
        ),
        get(
            "AddRequestParameter: after a query ending in `&`",
            "/arp/bob?a=1&",
        ),
        get(
            "AddRequestParameter: after an encoded query",
            "/arp/bob?q=a%20b",
        ),
        get(
            "RemoveRequestParameter: every occurrence, the rest in order",
            "/rrp/x?keep=1&debug=1&debug=2&flag",
        ),
        get(
            "RemoveRequestParameter: an encoded name",
            "/rrp/x?%64ebug=1&keep=1",
        ),
        // Spring decodes the query and encodes what it keeps again.
        get(
            "RemoveRequestParameter: what is kept, as sent",
            "/rrp/x?keep=a+b&debug=1",
        ),
        get(
            "RemoveRequestParameter: a kept value with `=` in it",
            "/rrp/x?sig=abc%3D%3D&next=/a?b=c&debug=1",
        ),
        get(
            "RemoveRequestParameter (expanded): the only parameter",
            "/rrp/x?trace=1",
        ),
        // ---- Response ----
        get(
            "AddResponseHeader: a path variable, a comma, after the upstream's",
            "/arsh/abc",
        )
        .upstream_header("X-Up: upstream"),
        get(
            "AddResponseHeader with override false: the upstream's value stays alone",
            "/arsh-keep/x",
        )
        .upstream_header("X-Up: upstream"),
        get(
            "AddResponseHeader with override false: added when the upstream has none",
            "/arsh-keep/x",
        ),
        get("SetResponseHeader: replaces every upstream line", "/srsh/x")
            .upstream_header("X-Up: one")
            .upstream_header("X-Up: two"),
        get(
            "RemoveResponseHeader: every line, in both spellings",
            "/rmrsh/x",
        )
        .upstream_header("X-Internal: 1")
        .upstream_header("X-Internal: 2")
        .upstream_header("X-Also-Internal: 3")
        .upstream_header("X-Kept: yes"),
        get("DedupeResponseHeader: RETAIN_FIRST, two names", "/dedupe/x")
            .upstream_header("X-Dup: a")
            .upstream_header("X-Dup: b")
            .upstream_header("X-Dup: a")
            .upstream_header("X-Other: 1")
            .upstream_header("X-Other: 2"),
        get(
            "DedupeResponseHeader (expanded): RETAIN_LAST",
            "/dedupe-last/x",
        )
        .upstream_header("X-Dup: a")
        .upstream_header("X-Dup: b")
        .upstream_header("X-Dup: c"),
        get("DedupeResponseHeader: RETAIN_UNIQUE", "/dedupe-unique/x")
            .upstream_header("X-Dup: a")
            .upstream_header("X-Dup: b")
            .upstream_header("X-Dup: a"),
        get(
            "RewriteResponseHeader: every match of every line",
            "/rwrsh/x",
        )
        .upstream_header("X-Debug: user=1&secret=abc&secret=def")
        .upstream_header("X-Debug: secret=x"),
        get(
            "RewriteResponseHeader (expanded): a group reference",
            "/rwrshx/x",
        )
        .upstream_header("X-Version: v2, v3"),
        // Spring applies response edits last filter first.
        get(
            "Response edits of one header: Add, then Set",
            "/resp-order/x",
        ),
        // Spring orders default and route filters by their index in their own list.
        get(
            "Default filters around a route's first filter",
            "/defaults/x",
        )
        .header("x-default", "forged"),
        get(
            "Default filters on a route without filters",
            "/path/wild/defaults",
        )
        .header("x-default-two", "forged"),
        get("SetStatus: over a 200", "/status/x"),
        get("SetStatus: over an upstream 500", "/status/x").upstream_status("500"),
        get("SetStatus (expanded): by name", "/status-named/x"),
        get("RedirectTo", "/redirect/x?y=1").answered(302),
        get("RedirectTo (expanded): a URL with a query", "/moved/x").answered(301),
        // Spring decodes the request's parameters, groups each name's values at its
        // first place after the URL's own, and quotes the result as java.net.URI does.
        get(
            "RedirectTo with the request's parameters",
            "/redirect-params/x?c=1&b=2&a=3&c=4&flag&empty=&sp=a+b%20c&amp=x%26y&pct=100%25&q=%3Chi%3E",
        )
        .answered(302),
        get(
            "RedirectTo with the request's parameters: none sent",
            "/redirect-params/x",
        )
        .answered(302),
        get(
            "RedirectTo (expanded) with the request's parameters",
            "/redirect-params-x/x?next=/a/b?c&lang=en",
        )
        .answered(307),
        get("SecureHeaders: the defaults", "/secure/x")
            .secure_headers()
            .known(
                &[
                    "response header x-xss-protection",
                    "response header content-security-policy",
                ],
                SECURE_HEADERS,
            ),
        get("SecureHeaders: the upstream's own value stays", "/secure/x")
            .upstream_header("X-Frame-Options: SAMEORIGIN")
            .secure_headers()
            .known(
                &[
                    "response header x-xss-protection",
                    "response header content-security-policy",
                ],
                SECURE_HEADERS,
            ),
        get(
            "RewriteLocationResponseHeader: the upstream's address and version replaced",
            "/loc/x",
        )
        .upstream_status("201")
        .upstream_header("Location: http://order-service:8081/v1/orders/1"),
        get(
            "RewriteLocationResponseHeader: a versioned request keeps the version",
            "/v1/loc/x",
        )
        .upstream_status("201")
        .upstream_header("Location: http://order-service:8081/v1/orders/1"),
        get("RewriteLocationResponseHeader: https", "/loc/x")
            .upstream_header("Location: https://order-service:8443/orders/2"),
        get(
            "RewriteLocationResponseHeader: a relative Location",
            "/loc/x",
        )
        .upstream_header("Location: /orders/3"),
        get(
            "RewriteLocationResponseHeader (expanded): a fixed host, the version kept",
            "/locx/x",
        )
        .upstream_header("Location: http://order-service:8081/v1/a"),
        get(
            "RewriteLocationResponseHeader (expanded): a scheme outside `protocols`",
            "/locx/x",
        )
        .upstream_header("Location: ftp://files:21/x"),
        // ---- Limits ----
        Case::with_body(
            "POST",
            "RequestSize: under the limit",
            "/size/x",
            "x".repeat(50),
        ),
        Case::with_body(
            "POST",
            "RequestSize: the limit exactly",
            "/size/x",
            "x".repeat(100),
        ),
        Case::with_body(
            "POST",
            "RequestSize: over the limit",
            "/size/x",
            "x".repeat(101),
        )
        .answered(413),
        get("RequestHeaderSize: under the limit", "/hsize/x").header("x-big", "a".repeat(900)),
        get("RequestHeaderSize: one header over", "/hsize/x")
            .header("x-big", "a".repeat(1100))
            .answered(431),
        get("RequestHeaderSize: a name's lines add up", "/hsize/x")
            .header("x-big", "a".repeat(600))
            .header("x-big", "a".repeat(600))
            .answered(431),
        // ---- Retry ----
        get("Retry: 5xx until a success", "/retry/x").upstream_status("500,503,200"),
        get(
            "Retry: attempts run out, the last answer stands",
            "/retry/x",
        )
        .upstream_status("500,502,504"),
        Case::with_body(
            "POST",
            "Retry: POST, not retried by default",
            "/retry/x",
            "once",
        )
        .upstream_status("500"),
        get("Retry: a 4xx, not retried", "/retry/x").upstream_status("404"),
        Case::with_body(
            "POST",
            "Retry (expanded): a listed status, the body sent again",
            "/retryx/x",
            "again",
        )
        .upstream_status("502,200"),
        get("Retry (expanded): an unlisted 5xx", "/retryx/x").upstream_status("500"),
        // The first pause (1s) ends inside the timeout (1.5s), the second would not,
        // each by half a second: two attempts, the last answer stands.
        get(
            "Retry with a timeout: no retry whose pause would end past it",
            "/retryt/x",
        )
        .upstream_status("500,500,500,200"),
        get(
            "Retry with jitter and a timeout (shortcut): retried as often",
            "/retryj/x",
        )
        .upstream_status("500,500,200"),
        // ---- RequestRateLimiter ----
        // Spring's buckets are in Redis, ours in the gateway: each counts its own.
        get("RequestRateLimiter: within the burst", "/limited/x").known(
            &["response header ratelimit-"],
            RATELIMIT_HEADERS,
        ),
        get("RequestRateLimiter: the rest of the burst", "/limited/x").known(
            &[
                "response header ratelimit-",
                "response header x-ratelimit-remaining",
            ],
            RATELIMIT_HEADERS_AND_WHOLE_SECONDS,
        ),
        get("RequestRateLimiter: the burst spent", "/limited/x").answered(429),
        // ---- CircuitBreaker ----
        get("CircuitBreaker: a success", "/cb/x"),
        get(
            "CircuitBreaker: a listed status goes to the fallback, query and all",
            "/cb/x?q=1",
        )
        .upstream_status("500")
        .known(&["upstream #2 header x-forwarded-"], FALLBACK_FORWARDED),
        get("CircuitBreaker: a status listed by number", "/cb/x")
            .upstream_status("418")
            .known(&["upstream #2 header x-forwarded-"], FALLBACK_FORWARDED),
        get("CircuitBreaker: an unlisted status is the answer", "/cb/x").upstream_status("404"),
        get(
            "CircuitBreaker: an unreachable upstream goes to the fallback",
            "/cbdown/x",
        )
        .known(&["upstream #1 header x-forwarded-"], FALLBACK_FORWARDED),
        get(
            "CircuitBreaker: an upstream slower than a second",
            "/cb/slow",
        )
        .upstream_delay_ms(1500)
        .known(&["response", "upstream"], TIME_LIMITER),
        // ---- Spring's binding forms ----
        get("Lists in expanded args: the first pattern", "/listed/a/x"),
        get("Lists in expanded args: the second pattern", "/listed/b/x"),
        Case::with_body(
            "PUT",
            "Lists in expanded args: the second method",
            "/listed/a/x",
            "put",
        ),
        Case::with_body(
            "POST",
            "Lists in expanded args: a method not listed",
            "/listed/a/x",
            "post",
        )
        .no_route(),
        get("Lists in expanded args: a source not listed", "/listed/a/x")
            .header("x-forwarded-for", "192.0.2.1")
            .no_route(),
        // ---- Failures ----
        get("A response timeout from the route's metadata", "/timeout/x")
            .upstream_delay_ms(1000)
            .answered(504),
        get("An unreachable upstream", "/down/x")
            .answered(502)
            .known(&["status"], UNREACHABLE),
        get(
            "An upstream 503 on a route without Retry",
            "/path/wild/busy",
        )
        .upstream_status("503")
        .known(&["upstream"], DEFAULT_RETRIES),
        // ---- What every route does ----
        get(
            "Hop-by-hop headers, and those the client's Connection names",
            "/path/wild/hop",
        )
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .header("te", "trailers")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic eDp5"),
        get(
            "X-Forwarded-* from a trusted proxy, extended",
            "/path/wild/forwarded",
        )
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "shop.example.org")
        .known(&["upstream #1 header x-forwarded-for"], TRUSTED_CHAIN),
        get(
            "Identity headers a client could forge",
            "/path/wild/identity",
        )
        .header("x-user-id", "admin")
        .header("x-user-roles", "admin")
        .known(&["upstream #1 header x-user-"], IDENTITY),
        get("An upstream's CORS headers", "/path/wild/cors")
            .upstream_header("Access-Control-Allow-Origin: *")
            .known(&["response header access-control-"], CORS),
        get(
            "The query, byte for byte",
            "/path/wild/q?a=1&a=2&b=&c=%2F%20+&d&e=%C3%A9",
        ),
        get("An empty query", "/path/exact?"),
        get(
            "The upstream's status and repeated headers",
            "/path/wild/created",
        )
        .upstream_status("201")
        .upstream_header("X-Up: a")
        .upstream_header("X-Up: b")
        .upstream_header("Set-Cookie: a=1")
        .upstream_header("Set-Cookie: b=2"),
    ]
}

// ---- Sending and comparing -----------------------------------------------------------

type HttpClient = Client<HttpConnector, Body>;

/// One of the two gateways under comparison.
#[derive(Debug, Clone)]
struct Side {
    name: &'static str,
    /// `127.0.0.1:port`.
    authority: String,
}

/// What a gateway answered; `status` 0 when no HTTP answer came, with why in `body`.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Headers,
    body: String,
}

/// One gateway's handling of one case: its answer and what the upstream saw.
#[derive(Debug)]
struct Observed {
    answer: Answer,
    seen: Vec<Seen>,
}

/// Sends `case` to the gateway at `authority`, tagged `tag`. Over hyper rather than
/// reqwest: the target must go out byte for byte (`..`, `%2F`, an empty query), and
/// reqwest's URL parsing would normalise it first.
async fn send(
    client: &HttpClient,
    authority: &str,
    case: &Case,
    tag: &str,
    bearer: &str,
) -> Answer {
    let failed = |why: String| Answer {
        status: 0,
        headers: Headers::new(),
        body: why,
    };
    let mut request = hyper::Request::new(Body::from(case.body.clone()));
    *request.method_mut() = Method::from_bytes(case.method.as_bytes()).expect("a method");
    *request.uri_mut() = format!("http://{authority}{}", case.target)
        .parse()
        .expect("a request target");
    let headers = request.headers_mut();
    if !case.headers.iter().any(|(name, _)| *name == "host") {
        headers.insert(header::HOST, HeaderValue::from_static(DEFAULT_HOST));
    }
    // Reactor Netty's client adds a User-Agent of its own to a request without one.
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("storefront-differential-test"),
    );
    headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    match case.token {
        Token::Alice => {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(bearer).expect("a bearer header"),
            );
        }
        Token::Invalid => {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_static("Bearer not-a-token"),
            );
        }
        Token::Missing => {}
    }
    headers.insert(
        HeaderName::from_static(CASE_TAG),
        HeaderValue::from_str(tag).expect("a tag"),
    );
    for (name, value) in &case.headers {
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
            HeaderValue::from_str(value).expect("a header value"),
        );
    }
    let response = match tokio::time::timeout(REQUEST_DEADLINE, client.request(request)).await {
        Err(_) => return failed(format!("(no answer within {REQUEST_DEADLINE:?})")),
        Ok(Err(error)) => return failed(format!("(no answer: {error:?})")),
        Ok(Ok(response)) => response,
    };
    let (parts, body) = response.into_parts();
    let body = match tokio::time::timeout(REQUEST_DEADLINE, body.collect()).await {
        Ok(Ok(collected)) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Ok(Err(error)) => format!("(the body broke off: {error})"),
        Err(_) => format!("(the body did not end within {REQUEST_DEADLINE:?})"),
    };
    Answer {
        status: parts.status.as_u16(),
        headers: headers_of(&parts.headers),
        body,
    }
}

/// `case` through `side`, and what the upstream saw of it. Every attempt the gateway
/// makes (retries, a fallback) reaches the upstream before the gateway answers, so
/// the record is complete once the answer is in.
async fn observe(
    client: &HttpClient,
    side: &Side,
    index: usize,
    case: &Case,
    bearer: &str,
    recorder: &Recorder,
) -> Observed {
    let tag = format!("{index}-{}", side.name);
    let answer = send(client, &side.authority, case, &tag, bearer).await;
    Observed {
        answer,
        seen: recorder.take(&tag),
    }
}

/// One way in which the two gateways handled a case differently.
#[derive(Debug)]
struct Difference {
    /// What differs: `status`, `response header x-up`, `upstream #1 path`...
    subject: String,
    ours: String,
    spring: String,
}

/// A response's headers as compared: for an answer from the upstream, all but those
/// expected to differ; for the gateway's own answers only where a redirect leads, as
/// their other headers and bodies are each gateway's own error format (problem+json
/// here, Spring's error JSON there).
fn comparable_response(headers: &Headers, case: &Case) -> Headers {
    headers
        .iter()
        .filter(|(name, _)| match case.expect {
            Expect::Upstream => {
                !RESPONSE_IGNORED.contains(&name.as_str())
                    && (case.secure_headers || !SPRING_SECURITY_DEFAULTS.contains(&name.as_str()))
            }
            Expect::NoRoute | Expect::Answered(_) => name.as_str() == "location",
        })
        .map(|(name, values)| (name.clone(), values.clone()))
        .collect()
}

/// Whether an answer is problem+json.
fn is_problem(answer: &Answer) -> bool {
    answer
        .headers
        .get("content-type")
        .is_some_and(|v| v.iter().any(|v| v.starts_with("application/problem+json")))
}

/// The `detail` of an error answer that is problem+json.
fn problem_detail(answer: &Answer) -> Option<String> {
    if answer.status < 400 || !is_problem(answer) {
        return None;
    }
    let problem: serde_json::Value = serde_json::from_str(&answer.body).ok()?;
    problem["detail"].as_str().map(str::to_owned)
}

/// A request's headers at the upstream as compared.
fn comparable_upstream(headers: &Headers) -> Headers {
    headers
        .iter()
        .filter(|(name, _)| !UPSTREAM_IGNORED.contains(&name.as_str()))
        .map(|(name, values)| {
            let values = if LIST_VALUED.contains(&name.as_str()) {
                let items: Vec<&str> = values
                    .iter()
                    .flat_map(|v| v.split(','))
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .collect();
                vec![items.join(", ")]
            } else {
                values.clone()
            };
            (name.clone(), values)
        })
        .collect()
}

fn shown_values(values: Option<&Vec<String>>) -> String {
    values.map_or_else(|| "(absent)".to_owned(), |v| format!("{v:?}"))
}

fn shown_text(text: &str) -> String {
    const AT_MOST: usize = 200;
    match text.char_indices().nth(AT_MOST) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// Every difference between `ours` and `spring` for `case`.
fn compare(case: &Case, ours: &Observed, spring: &Observed) -> Vec<Difference> {
    let mut found = Vec::new();
    let mut note = |subject: String, mine: String, theirs: String| {
        if mine != theirs {
            found.push(Difference {
                subject,
                ours: mine,
                spring: theirs,
            });
        }
    };
    let (a, b) = (&ours.answer, &spring.answer);
    if a.status != b.status {
        // Two different answers: their headers would only repeat that.
        let with_why = |answer: &Answer| match answer.status {
            0 => answer.body.clone(),
            status => status.to_string(),
        };
        note("status".into(), with_why(a), with_why(b));
    } else {
        let (ours_headers, spring_headers) = (
            comparable_response(&a.headers, case),
            comparable_response(&b.headers, case),
        );
        let converted = problem_detail(a).is_some() && !is_problem(b);
        let names: BTreeSet<&String> = ours_headers.keys().chain(spring_headers.keys()).collect();
        for name in names {
            if converted && name == "content-type" {
                continue;
            }
            note(
                format!("response header {name}"),
                shown_values(ours_headers.get(name)),
                shown_values(spring_headers.get(name)),
            );
        }
        if case.expect == Expect::Upstream {
            match problem_detail(a) {
                // The contract: every 4xx and 5xx body is problem+json. An upstream's
                // own error body reaches the client as the problem's `detail`, where
                // Spring passes it as it came.
                Some(detail) if !is_problem(b) => note(
                    "response body (as the problem's detail)".into(),
                    shown_text(detail.trim()),
                    shown_text(b.body.trim()),
                ),
                _ => note(
                    "response body".into(),
                    shown_text(&a.body),
                    shown_text(&b.body),
                ),
            }
        }
    }
    note(
        "upstream attempts".into(),
        ours.seen.len().to_string(),
        spring.seen.len().to_string(),
    );
    for (n, (o, s)) in ours.seen.iter().zip(&spring.seen).enumerate() {
        let at = format!("upstream #{}", n + 1);
        note(format!("{at} method"), o.method.clone(), s.method.clone());
        note(
            format!("{at} path"),
            shown_text(&o.path),
            shown_text(&s.path),
        );
        note(
            format!("{at} query"),
            format!("{:?}", o.query),
            format!("{:?}", s.query),
        );
        let (oh, sh) = (
            comparable_upstream(&o.headers),
            comparable_upstream(&s.headers),
        );
        let names: BTreeSet<&String> = oh.keys().chain(sh.keys()).collect();
        for name in names {
            note(
                format!("{at} header {name}"),
                shown_values(oh.get(name)),
                shown_values(sh.get(name)),
            );
        }
        note(
            format!("{at} body"),
            shown_text(&o.body),
            shown_text(&s.body),
        );
    }
    if let (Some(o), Some(s)) = (case.expect.unmet(ours), case.expect.unmet(spring)) {
        found.push(Difference {
            subject: format!("expectation: {}, which neither gave", case.expect),
            ours: o,
            spring: s,
        });
    }
    found
}

/// The differences of every case: those that fail the test, and the known ones.
#[derive(Debug, Default)]
struct Report {
    failures: String,
    failing_cases: usize,
    differences: usize,
    /// Known differences that showed, with their reasons.
    known: String,
    /// Known differences that did not show: their cases may have become plain ones.
    unseen: String,
}

impl Report {
    fn add(&mut self, index: usize, case: &Case, differences: Vec<Difference>) {
        let title = format!("#{index} {} ({} {})", case.name, case.method, case.target);
        let list = |items: &[Difference]| {
            items.iter().fold(String::new(), |mut out, d| {
                let _ = writeln!(
                    out,
                    "    {}: ours {} | spring {}",
                    d.subject, d.ours, d.spring
                );
                out
            })
        };
        let (known, unexpected): (Vec<Difference>, Vec<Difference>) = differences
            .into_iter()
            .partition(|d| case.known.is_some_and(|k| k.covers(d)));
        if !unexpected.is_empty() {
            self.failing_cases += 1;
            self.differences += unexpected.len();
            let _ = write!(self.failures, "{title}\n{}", list(&unexpected));
        }
        if let Some(expected) = case.known {
            if known.is_empty() {
                let _ = writeln!(
                    self.unseen,
                    "{title}: expected a difference in {:?}: {}",
                    expected.subjects, expected.why
                );
            } else {
                let _ = write!(
                    self.known,
                    "{title}\n    why: {}\n{}",
                    expected.why,
                    list(&known)
                );
            }
        }
    }
}

// ---- Spring Cloud Gateway -------------------------------------------------------------

/// Spring Cloud Gateway (`interop/gateway`'s jar) as a child process, killed when the
/// test ends, however it ends.
struct SpringGateway {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl SpringGateway {
    /// Starts the jar on a free port of the loopback with `routes` as an additional
    /// config file, checking tokens as a resource server of the gateway at `ours`.
    /// Its output goes to a log in `dir`.
    fn start(
        jar: &str,
        routes: &Path,
        ours: &str,
        issuer: &str,
        audience: &str,
        redis: &str,
        dir: &Path,
    ) -> Self {
        let port = free_port();
        let log = dir.join("spring-gateway.log");
        let out = std::fs::File::create(&log).expect("log");
        let child = tokio::process::Command::new(java())
            // A small heap and the quick compiler: startup matters here, throughput not.
            .args(["-Xmx256m", "-XX:TieredStopAtLevel=1", "-jar", jar])
            .arg(format!("--server.port={port}"))
            .arg("--server.address=127.0.0.1")
            // The routes: the very file our gateway reads.
            .arg(format!(
                "--spring.config.additional-location=file:{}",
                routes.display()
            ))
            // Every route names a fixed uri: no registry to look for.
            .arg("--eureka.client.enabled=false")
            .arg(format!(
                "--spring.security.oauth2.resourceserver.jwt.jwk-set-uri={ours}/.well-known/jwks.json"
            ))
            .arg(format!(
                "--spring.security.oauth2.resourceserver.jwt.audiences={audience}"
            ))
            .arg(format!("--storefront.jwt.issuer={issuer}"))
            // Where RequestRateLimiter's RedisRateLimiter keeps its buckets; the jar
            // leaves Redis off unless told (its application.properties).
            .arg("--spring.autoconfigure.exclude=")
            .arg(format!("--spring.data.redis.url={redis}"))
            // The counterpart of our `trusted_proxies: [127.0.0.1/32]`. Without it
            // Spring strips every X-Forwarded-* header and writes none.
            .arg(r"--spring.cloud.gateway.server.webflux.trusted-proxies=127\.0\.0\.1")
            // The routes Spring loaded, read once it is up (GET only).
            .arg("--management.endpoints.web.exposure.include=health,gateway")
            .arg("--management.endpoint.gateway.access=read-only")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("java runs Spring Cloud Gateway");
        SpringGateway { child, port, log }
    }

    fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The end of its log.
    fn said(&self) -> String {
        const LINES: usize = 150;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LINES)..].join("\n")
    }

    /// Waits until its health answers 200, then checks that it loaded every route of
    /// the file: a route Spring cannot bind is only logged, and every case on it would
    /// then fail as a 404.
    async fn ready(&mut self, client: &reqwest::Client, bearer: &str, route_ids: &[String]) {
        let deadline = tokio::time::Instant::now() + SPRING_START_DEADLINE;
        let health = format!("http://{}/actuator/health", self.authority());
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "Spring Cloud Gateway stopped ({status}) before it was ready:\n{}",
                    self.said()
                );
            }
            if client
                .get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Spring Cloud Gateway was not ready within {SPRING_START_DEADLINE:?}:\n{}",
                self.said()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let response = client
            .get(format!(
                "http://{}/actuator/gateway/routes",
                self.authority()
            ))
            .header("authorization", bearer)
            .send()
            .await
            .expect("Spring's routes endpoint answers");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(
            status,
            reqwest::StatusCode::OK,
            "Spring's /actuator/gateway/routes: {body}\n{}",
            self.said()
        );
        let listed: serde_json::Value = serde_json::from_str(&body).expect("the routes as JSON");
        let loaded: BTreeSet<&str> = listed
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|route| route["route_id"].as_str())
            .collect();
        let missing: Vec<&String> = route_ids
            .iter()
            .filter(|id| !loaded.contains(id.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "Spring Cloud Gateway did not load the routes {missing:?}:\n{}",
            self.said()
        );
    }
}

/// `$JAVA_HOME/bin/java` when there is one, else `java` from the PATH, as xtask finds
/// it.
fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .filter(|home| !home.is_empty())
        .map(|home| PathBuf::from(home).join("bin").join("java"))
        .filter(|java| java.is_file())
        .unwrap_or_else(|| PathBuf::from("java"))
}

/// A port of the loopback nobody listens on (now).
fn free_port() -> u16 {
    shared::ports::unused_loopback_port().expect("a free port")
}

/// The ids of the routes in `routes`.
fn route_ids(routes: &str) -> Vec<String> {
    let file: serde_yaml_ng::Value = serde_yaml_ng::from_str(routes).expect("the routes are YAML");
    file["spring"]["cloud"]["gateway"]["server"]["webflux"]["routes"]
        .as_sequence()
        .expect("a list of routes")
        .iter()
        .filter_map(|route| route["id"].as_str().map(str::to_owned))
        .collect()
}

/// Requests that only warm both gateways up. The first trips through a cold JVM are
/// slow, and Resilience4J's time limiter (1 s by default) would turn a slow first trip
/// through the circuit breaker's route into a fallback. Few enough that our breaker
/// (ten calls at least before it judges) never judges.
async fn warm_up(client: &HttpClient, sides: &[Side], bearer: &str) {
    for side in sides {
        let tag = format!("warm-up-{}", side.name);
        for _ in 0..3 {
            for target in [
                "/path/wild/warm-up",
                "/cb/warm-up",
                "/retry/warm-up",
                "/arh/warm-up",
            ] {
                send(
                    client,
                    &side.authority,
                    &Case::get("warm-up", target),
                    &tag,
                    bearer,
                )
                .await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_gateway_and_spring_cloud_gateway_handle_the_same_routes_alike() {
    let jar = std::env::var("STOREFRONT_SPRING_GATEWAY").expect(
        "STOREFRONT_SPRING_GATEWAY names Spring Cloud Gateway's jar; run the tests with `cargo xtask test`",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (upstream, recorder) = recording_upstream().await;
    let redis = std::env::var("STOREFRONT_REDIS_URL").expect(
        "STOREFRONT_REDIS_URL names the test Redis, where Spring's RequestRateLimiter keeps its \
         buckets; run the tests with `cargo xtask test`",
    );
    let routes_text = ROUTES
        .replace(
            "{{RUN}}",
            &format!("{}-{}", std::process::id(), shared::now_ms()),
        )
        .replace("{{UPSTREAM}}", &upstream.to_string())
        .replace("{{CLOSED}}", &format!("127.0.0.1:{}", free_port()));
    let routes = dir.path().join("routes.yml");
    std::fs::write(&routes, &routes_text).expect("routes");

    let (registry, _stop_registry) = support::registry().await;
    let mut settings = support::gateway_settings(registry, &routes);
    // The test's client is the proxy in front of both gateways: both believe its
    // X-Forwarded-* headers (see Spring's `trusted-proxies` in SpringGateway::start).
    settings.trusted_proxies = vec!["127.0.0.1/32".into()];
    let (issuer, audience) = (settings.auth.issuer.clone(), settings.auth.audience.clone());
    let (our_gateway, _stop_ours) = support::start_gateway(settings).await;
    let bearer = support::alice_bearer(&our_gateway).await;

    let mut spring = SpringGateway::start(
        &jar,
        &routes,
        &our_gateway,
        &issuer,
        &audience,
        &redis,
        dir.path(),
    );
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    spring
        .ready(&probe, &bearer, &route_ids(&routes_text))
        .await;

    // A connection per request: after answering some refusals itself (431, 404) Spring
    // can leave a kept-alive connection unanswered, and each case should stand alone.
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let sides = [
        Side {
            name: "ours",
            authority: our_gateway.trim_start_matches("http://").to_owned(),
        },
        Side {
            name: "spring",
            authority: spring.authority(),
        },
    ];
    warm_up(&client, &sides, &bearer).await;

    let cases = cases();
    let mut report = Report::default();
    for (index, case) in cases.iter().enumerate() {
        let ours = observe(&client, &sides[0], index, case, &bearer, &recorder).await;
        let theirs = observe(&client, &sides[1], index, case, &bearer, &recorder).await;
        report.add(index, case, compare(case, &ours, &theirs));
    }

    if !report.known.is_empty() {
        eprintln!(
            "Known differences (reported, not failed):\n{}",
            report.known
        );
    }
    if !report.unseen.is_empty() {
        eprintln!(
            "Known differences that did not show (these cases may now be plain ones):\n{}",
            report.unseen
        );
    }
    assert!(
        report.failures.is_empty(),
        "{} differences in {} of {} cases between our gateway and Spring Cloud Gateway:\n{}\n\
         Spring Cloud Gateway's log, last lines:\n{}",
        report.differences,
        report.failing_cases,
        cases.len(),
        report.failures,
        spring.said()
    );
}
