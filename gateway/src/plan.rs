//! A route's filters compiled, once when the routes load, into the stages of the
//! request path that apply them. The request path never looks at a filter it does not
//! need: each phase reads only its own list, in the order the file wrote it.
//!
//! Adding a filter is: a variant in the stage it belongs to (or a field of [`Plan`]
//! when it decides whether the request goes on at all), its arguments parsed in
//! `routes::parse_filter`, and one match arm in that stage's `apply`.

use std::{sync::Arc, time::Duration};

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};

use crate::{breaker::CircuitBreaker, limits::RateLimiter, routes::RewriteLocation};

/// A filter as written, parsed and typed: which stage it belongs to and its arguments.
#[derive(Debug, Clone)]
pub enum Filter {
    /// Largest request body accepted, in bytes (`RequestSize`).
    RequestSize(u64),
    /// Largest size of any one request header, name and values (`RequestHeaderSize`).
    RequestHeaderSize(usize),
    /// Answers at once with a redirect; the upstream is never called (`RedirectTo`).
    RedirectTo(Redirect),
    Retry(RetryPolicy),
    CircuitBreaker(Arc<CircuitBreaker>),
    /// Token buckets per user or client IP, shared by every request of the route.
    RequestRateLimiter(Arc<RateLimiter>),
    Path(PathEdit),
    Query(QueryEdit),
    RequestHeader(HeaderEdit),
    Response(ResponseEdit),
}

/// `RedirectTo`: the status and URL answered, and whether the request's query
/// parameters are added to the URL's (`includeRequestParams`).
#[derive(Debug, Clone)]
pub struct Redirect {
    pub status: StatusCode,
    pub url: HeaderValue,
    pub include_request_params: bool,
}

impl Redirect {
    /// The `Location` answered to a request with `query`. With the request's
    /// parameters, Spring's rebuild of the URL: its own parameters, then the request's,
    /// each decoded and grouped under the name's first place, then quoted as
    /// `java.net.URI` quotes a query (what is not a legal URI character, and every
    /// `%`; non-ASCII too, where Spring would leave it raw in the header).
    pub fn location(&self, query: Option<&str>) -> HeaderValue {
        let query = query.filter(|q| !q.is_empty());
        let (Some(query), true) = (query, self.include_request_params) else {
            return self.url.clone();
        };
        let Ok(url) = std::str::from_utf8(self.url.as_bytes()) else {
            return self.url.clone();
        };
        let (url, fragment) = url
            .split_once('#')
            .map_or((url, None), |(u, f)| (u, Some(f)));
        let (base, own) = url.split_once('?').unwrap_or((url, ""));
        let mut grouped: Vec<(String, Vec<Option<String>>)> = Vec::new();
        let own = spring_query_params(own, false);
        for (name, value) in own.into_iter().chain(spring_query_params(query, true)) {
            match grouped.iter_mut().find(|(known, _)| *known == name) {
                Some((_, values)) => values.push(value),
                None => grouped.push((name, vec![value])),
            }
        }
        let mut rebuilt = String::new();
        for (name, values) in &grouped {
            for value in values {
                if !rebuilt.is_empty() {
                    rebuilt.push('&');
                }
                rebuilt.push_str(name);
                if let Some(value) = value {
                    rebuilt.push('=');
                    rebuilt.push_str(value);
                }
            }
        }
        let mut location = base.to_owned();
        if !rebuilt.is_empty() {
            location.push('?');
            location.extend(percent_encoding::utf8_percent_encode(
                &rebuilt,
                NOT_URI_QUERY,
            ));
        }
        if let Some(fragment) = fragment {
            location.push('#');
            location.push_str(fragment);
        }
        HeaderValue::from_str(&location).unwrap_or_else(|_| self.url.clone())
    }
}

/// A query's parameters as Spring reads them (`([^&=]+)(=?)([^&]+)?`): a name, and
/// a value (empty after a bare `=`, none without one); both decoded when `decode`
/// (a request's, as `getQueryParams` gives them), else as written (a URL's own).
fn spring_query_params(query: &str, decode: bool) -> Vec<(String, Option<String>)> {
    let read = |text: &str| match decode {
        true => decode_query(text),
        false => text.to_owned(),
    };
    query
        .split('&')
        .map(|pair| pair.trim_start_matches('='))
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) => (read(name), Some(read(value))),
            None => (read(pair), None),
        })
        .collect()
}

/// What `java.net.URI`'s constructors quote in a query: everything but letters,
/// digits, its unreserved marks (`_-!.~'()*`) and reserved characters
/// (`;/?:@&=+$,[]`). `%` is always quoted.
const NOT_URI_QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'-')
    .remove(b'!')
    .remove(b'.')
    .remove(b'~')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b';')
    .remove(b'/')
    .remove(b'?')
    .remove(b':')
    .remove(b'@')
    .remove(b'&')
    .remove(b'=')
    .remove(b'+')
    .remove(b'$')
    .remove(b',')
    .remove(b'[')
    .remove(b']');

/// A route's filters by the phase that applies them.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub header_size: Option<usize>,
    pub redirect: Option<Redirect>,
    pub limiters: Vec<Arc<RateLimiter>>,
    pub body_limit: Option<u64>,
    pub path: Vec<PathEdit>,
    pub query: Vec<QueryEdit>,
    pub headers: Vec<HeaderEdit>,
    pub response: Vec<ResponseEdit>,
    pub breaker: Option<Arc<CircuitBreaker>>,
    pub retry: RetryPolicy,
    /// Whether a value names a `{variable}` of the Path predicate (or `SetPath` fills
    /// one), so the request path matches the variables only for routes that use them.
    pub templated: bool,
    /// Whether a response edit needs the client's own host and path.
    pub reads_asked: bool,
}

impl Plan {
    /// The plan of a route's filters, `defaults` and its `own` in the order Spring runs
    /// them. A route's own `Retry` or `CircuitBreaker` replaces a default one.
    pub fn for_route(ordered: &[Filter], own: &[Filter]) -> Self {
        let mut plan = Self::of(ordered);
        for filter in own {
            match filter {
                Filter::Retry(policy) => plan.retry = policy.clone(),
                Filter::CircuitBreaker(breaker) => plan.breaker = Some(breaker.clone()),
                _ => {}
            }
        }
        plan
    }

    /// The plan of `filters`, in the order they run.
    pub fn of(filters: &[Filter]) -> Self {
        let mut plan = Plan::default();
        for filter in filters {
            match filter {
                // Each of Spring's size filters applies: the smallest limit holds.
                Filter::RequestSize(max) => {
                    plan.body_limit = Some(plan.body_limit.map_or(*max, |m| m.min(*max)));
                }
                Filter::RequestHeaderSize(max) => {
                    plan.header_size = Some(plan.header_size.map_or(*max, |m| m.min(*max)));
                }
                // The first redirect answers; later ones are never reached.
                Filter::RedirectTo(redirect) => {
                    plan.redirect.get_or_insert_with(|| redirect.clone());
                }
                Filter::Retry(policy) => plan.retry = policy.clone(),
                Filter::CircuitBreaker(breaker) => plan.breaker = Some(breaker.clone()),
                Filter::RequestRateLimiter(limiter) => plan.limiters.push(limiter.clone()),
                Filter::Path(edit) => plan.path.push(edit.clone()),
                Filter::Query(edit) => plan.query.push(edit.clone()),
                Filter::RequestHeader(edit) => plan.headers.push(edit.clone()),
                Filter::Response(edit) => plan.response.push(edit.clone()),
            }
        }
        plan.templated = plan.path.iter().any(|e| matches!(e, PathEdit::Set(_)))
            || plan.query.iter().any(QueryEdit::is_templated)
            || plan.headers.iter().any(HeaderEdit::is_templated)
            || plan.response.iter().any(ResponseEdit::is_templated);
        plan.reads_asked = plan
            .response
            .iter()
            .any(|e| matches!(e, ResponseEdit::RewriteLocation(_)));
        plan
    }

    /// The path of a breaker's `fallbackUri: forward:<path>`.
    pub fn fallback(&self) -> Option<&str> {
        self.breaker.as_ref()?.fallback.as_deref()
    }
}

/// The `{variables}` the Path and Host predicates captured from one request: name and
/// value as matched.
pub type Variables<'r> = [(&'r str, String)];

fn names_variable(value: &[u8]) -> bool {
    value.contains(&b'{') && value.contains(&b'}')
}

/// An edit of the upstream path.
#[derive(Debug, Clone)]
pub enum PathEdit {
    /// Drops the first `n` segments (`StripPrefix`).
    Strip(usize),
    /// A regex and its replacement (`RewritePath`).
    Rewrite(regex::Regex, String),
    /// A template filled from the Path and Host predicates' `{variables}` (`SetPath`).
    Set(String),
    /// Put before the path (`PrefixPath`).
    Prefix(String),
}

impl PathEdit {
    /// The upstream path after `edits`, in the order they are written. `None` when a
    /// captured variable would change the path's shape (`..`, an encoded slash):
    /// placed into a template it could climb out of the intended prefix.
    pub fn apply_all(edits: &[PathEdit], path: &str, variables: &Variables<'_>) -> Option<String> {
        let mut edited = path.to_owned();
        for edit in edits {
            match edit {
                PathEdit::Set(template) => {
                    let mut filled = template.clone();
                    for (name, value) in variables {
                        let lower = value.to_ascii_lowercase();
                        if value == "."
                            || value == ".."
                            || lower.contains("%2f")
                            || lower.contains("%5c")
                            || lower.contains("%2e")
                        {
                            return None;
                        }
                        filled = filled.replace(&format!("{{{name}}}"), value);
                    }
                    edited = filled;
                }
                PathEdit::Prefix(prefix) => edited = format!("{prefix}{edited}"),
                PathEdit::Strip(n) => {
                    let rest: Vec<&str> = edited
                        .split('/')
                        .filter(|s| !s.is_empty())
                        .skip(*n)
                        .collect();
                    // A trailing slash stays, as Spring keeps it.
                    let slash = if edited.ends_with('/') && !rest.is_empty() {
                        "/"
                    } else {
                        ""
                    };
                    edited = format!("/{}{slash}", rest.join("/"));
                }
                // Every match, as Java's `replaceAll`.
                PathEdit::Rewrite(regex, replacement) => {
                    edited = regex
                        .replace_all(&edited, replacement.as_str())
                        .into_owned();
                }
            }
        }
        Some(edited)
    }
}

/// An edit of the upstream query.
#[derive(Debug, Clone)]
pub enum QueryEdit {
    /// `AddRequestParameter`: a name and a value, which may name path variables.
    Add(String, String),
    /// `RemoveRequestParameter`: every parameter of that (decoded) name.
    Remove(String),
}

impl QueryEdit {
    fn is_templated(&self) -> bool {
        matches!(self, QueryEdit::Add(_, value) if names_variable(value.as_bytes()))
    }

    /// The upstream query after `edits`; untouched (not even re-encoded) without any,
    /// and re-encoded whole after a removal, as Spring rebuilds it from the decoded
    /// parameters. An empty query is none.
    pub fn apply_all(
        edits: &[QueryEdit],
        query: Option<&str>,
        variables: &Variables<'_>,
    ) -> Option<String> {
        let query = query.filter(|q| !q.is_empty());
        if edits.is_empty() {
            return query.map(str::to_owned);
        }
        let removes = edits.iter().any(|e| matches!(e, QueryEdit::Remove(_)));
        let mut pairs: Vec<String> = query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                if !removes {
                    return pair.to_owned();
                }
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                let encoded = encode_query(&decode_query(name));
                if pair.contains('=') {
                    format!("{encoded}={}", encode_query(&decode_query(value)))
                } else {
                    encoded
                }
            })
            .collect();
        for edit in edits {
            match edit {
                QueryEdit::Add(name, value) => {
                    let mut value = value.clone();
                    for (variable, raw) in variables {
                        let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
                        value = value.replace(&format!("{{{variable}}}"), &decoded);
                    }
                    pairs.push(format!("{}={}", encode_query(name), encode_query(&value)));
                }
                QueryEdit::Remove(name) => {
                    // Compared decoded, as the upstream will read it: `%64ebug` is `debug`.
                    pairs
                        .retain(|p| decode_query(p.split('=').next().unwrap_or_default()) != *name);
                }
            }
        }
        (!pairs.is_empty()).then(|| pairs.join("&"))
    }
}

/// A query component (a name or a value) decoded as the upstream reads it (`+` is a
/// space, `%XX` a byte, bytes that are not UTF-8 replaced, a malformed escape kept as
/// written); an `=` in it stays, as in a base64 value's padding.
pub fn decode_query(text: &str) -> String {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode_query(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, NOT_UNRESERVED).to_string()
}

/// An edit of the headers the upstream gets.
#[derive(Debug, Clone)]
pub enum HeaderEdit {
    /// `AddRequestHeader`: one more value.
    Add(HeaderName, HeaderValue),
    /// `SetRequestHeader`: replaces the values.
    Set(HeaderName, HeaderValue),
    /// `RemoveRequestHeader`.
    Remove(HeaderName),
    /// `AddRequestHeadersIfNotPresent`: each header the request does not carry yet.
    AddIfAbsent(Vec<(HeaderName, HeaderValue)>),
    /// `MapRequestHeader`: the values of the first header copied into the second.
    Map(HeaderName, HeaderName),
    /// `SetRequestHostHeader`: the `Host` the upstream sees.
    SetHost(HeaderValue),
    /// `PreserveHostHeader`: the upstream sees the client's `Host`, not its own address.
    PreserveHost,
}

impl HeaderEdit {
    fn is_templated(&self) -> bool {
        matches!(self, HeaderEdit::Add(_, v) | HeaderEdit::Set(_, v) if names_variable(v.as_bytes()))
    }

    /// Applies `edits` in order; `PreserveHostHeader` puts back `client_host`, the
    /// `Host` the client sent.
    pub fn apply_all(
        edits: &[HeaderEdit],
        headers: &mut HeaderMap,
        variables: &Variables<'_>,
        client_host: Option<&HeaderValue>,
    ) {
        for edit in edits {
            match edit {
                HeaderEdit::Add(name, value) => {
                    headers.append(name.clone(), expand(value, variables));
                }
                HeaderEdit::Remove(name) => {
                    headers.remove(name);
                }
                HeaderEdit::Set(name, value) => {
                    headers.insert(name.clone(), expand(value, variables));
                }
                // Absent is no value but blanks, as Spring reads it; every value given
                // for such a name is added.
                HeaderEdit::AddIfAbsent(pairs) => {
                    let absent: Vec<&HeaderName> = pairs
                        .iter()
                        .map(|(name, _)| name)
                        .filter(|name| {
                            headers
                                .get_all(*name)
                                .iter()
                                .all(|v| v.as_bytes().iter().all(u8::is_ascii_whitespace))
                        })
                        .collect();
                    for (name, value) in pairs {
                        if absent.contains(&name) {
                            headers.append(name.clone(), value.clone());
                        }
                    }
                }
                HeaderEdit::Map(from, to) => {
                    let values: Vec<HeaderValue> = headers.get_all(from).iter().cloned().collect();
                    for value in values {
                        headers.append(to.clone(), value);
                    }
                }
                HeaderEdit::SetHost(host) => {
                    headers.insert(header::HOST, host.clone());
                }
                HeaderEdit::PreserveHost => {
                    if let Some(host) = client_host {
                        headers.insert(header::HOST, host.clone());
                    }
                }
            }
        }
    }
}

/// An edit of the response the client gets.
#[derive(Debug, Clone)]
pub enum ResponseEdit {
    /// `AddResponseHeader`.
    Add(HeaderName, HeaderValue),
    /// `AddResponseHeader` with `override: false`: added only when the response has
    /// no value of the header with text in it.
    AddIfBlank(HeaderName, HeaderValue),
    /// `SetResponseHeader`.
    Set(HeaderName, HeaderValue),
    /// `RemoveResponseHeader`.
    Remove(HeaderName),
    /// `DedupeResponseHeader`: one value of each named header, by the strategy.
    Dedupe(Vec<HeaderName>, Dedupe),
    /// `RewriteResponseHeader`: a header's values through a regex and a replacement.
    Rewrite(HeaderName, regex::Regex, String),
    /// `SetStatus`: the status the client gets, whatever the upstream answered.
    SetStatus(StatusCode),
    /// `SecureHeaders`, Spring's defaults where the response has none.
    SecureHeaders,
    /// `RewriteLocationResponseHeader`: the address the client used in place of the
    /// upstream's own in a redirect's `Location`.
    RewriteLocation(Box<RewriteLocation>),
}

/// Which value `DedupeResponseHeader` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedupe {
    RetainFirst,
    RetainLast,
    RetainUnique,
}

/// What the client asked, before any filter edited it: response edits that put the
/// gateway's address back need it, and edits that name path variables read them.
/// Each part is taken only for a route that reads it.
#[derive(Debug)]
pub struct Asked<'r> {
    pub host: Option<String>,
    pub path: String,
    pub variables: Vec<(&'r str, String)>,
}

impl ResponseEdit {
    fn is_templated(&self) -> bool {
        matches!(self, ResponseEdit::Add(_, v) | ResponseEdit::AddIfBlank(_, v) | ResponseEdit::Set(_, v) if names_variable(v.as_bytes()))
    }

    /// Applies `edits` to the response's status and headers, the last written first:
    /// each of Spring's response filters edits the response on its way back through
    /// the chain, so the filter nearest the upstream edits first.
    pub fn apply_all(
        edits: &[ResponseEdit],
        status: &mut StatusCode,
        headers: &mut HeaderMap,
        asked: &Asked<'_>,
    ) {
        for edit in edits.iter().rev() {
            match edit {
                ResponseEdit::Add(name, value) => {
                    headers.append(name.clone(), expand(value, &asked.variables));
                }
                ResponseEdit::AddIfBlank(name, value) => {
                    let blank = headers
                        .get_all(name)
                        .iter()
                        .all(|v| v.as_bytes().iter().all(u8::is_ascii_whitespace));
                    if blank {
                        headers.append(name.clone(), expand(value, &asked.variables));
                    }
                }
                ResponseEdit::Set(name, value) => {
                    headers.insert(name.clone(), expand(value, &asked.variables));
                }
                ResponseEdit::Remove(name) => {
                    headers.remove(name);
                }
                ResponseEdit::Dedupe(names, strategy) => {
                    for name in names {
                        dedupe(headers, name, *strategy);
                    }
                }
                ResponseEdit::Rewrite(name, regex, replacement) => {
                    let rewritten: Vec<HeaderValue> = headers
                        .get_all(name)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .filter_map(|v| {
                            HeaderValue::from_str(&regex.replace_all(v, replacement.as_str())).ok()
                        })
                        .collect();
                    if !rewritten.is_empty() {
                        headers.remove(name);
                        for value in rewritten {
                            headers.append(name.clone(), value);
                        }
                    }
                }
                ResponseEdit::SetStatus(set) => *status = *set,
                ResponseEdit::SecureHeaders => secure_headers(headers),
                ResponseEdit::RewriteLocation(rewrite) => {
                    rewrite.apply(headers, asked.host.as_deref(), &asked.path);
                }
            }
        }
    }
}

/// `value` with each `{name}` replaced by that path variable, percent-decoded (a
/// value that would not be a valid header then keeps the variable as matched).
fn expand(value: &HeaderValue, variables: &Variables<'_>) -> HeaderValue {
    if variables.is_empty() || !value.as_bytes().contains(&b'{') {
        return value.clone();
    }
    let Ok(text) = value.to_str() else {
        return value.clone();
    };
    let mut filled = text.to_owned();
    for (name, raw) in variables {
        let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        let fits = HeaderValue::from_str(&decoded).is_ok();
        filled = filled.replace(
            &format!("{{{name}}}"),
            if fits { decoded.as_ref() } else { raw.as_str() },
        );
    }
    HeaderValue::from_str(&filled).unwrap_or_else(|_| value.clone())
}

/// Keeps one value of `name` (or each distinct one), comparing whole values as Spring
/// does: a value holding commas (a cookie's expiry date) is never cut apart.
fn dedupe(headers: &mut HeaderMap, name: &HeaderName, strategy: Dedupe) {
    let values: Vec<HeaderValue> = headers.get_all(name).iter().cloned().collect();
    if values.len() < 2 {
        return;
    }
    let kept: Vec<HeaderValue> = match strategy {
        Dedupe::RetainFirst => values.into_iter().take(1).collect(),
        Dedupe::RetainLast => values.into_iter().last().into_iter().collect(),
        Dedupe::RetainUnique => {
            let mut seen: Vec<HeaderValue> = Vec::new();
            for v in values {
                if !seen.contains(&v) {
                    seen.push(v);
                }
            }
            seen
        }
    };
    headers.remove(name);
    for value in kept {
        headers.append(name.clone(), value);
    }
}

/// Spring Cloud Gateway's `SecureHeaders` defaults, each set where the response has
/// none. (Public for the benchmark's floor, which puts the same bytes on the wire.)
pub static SECURE_HEADERS: [(HeaderName, HeaderValue); 7] = [
    (
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ),
    (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    (
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    ),
    (header::X_XSS_PROTECTION, HeaderValue::from_static("0")),
    (
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=631138519"),
    ),
    (
        HeaderName::from_static("x-download-options"),
        HeaderValue::from_static("noopen"),
    ),
    (
        HeaderName::from_static("x-permitted-cross-domain-policies"),
        HeaderValue::from_static("none"),
    ),
];

fn secure_headers(headers: &mut HeaderMap) {
    // Room for all at once, and one hashed lookup per name rather than two.
    headers.reserve(SECURE_HEADERS.len());
    for (name, value) in &SECURE_HEADERS {
        headers.entry(name.clone()).or_insert_with(|| value.clone());
    }
}

/// Why an attempt got no usable answer, in the terms of Spring's `exceptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The connection failed or broke (`java.io.IOException` and its kind).
    Io,
    /// No answer within the response timeout (`java.util.concurrent.TimeoutException`).
    Timeout,
}

/// When a failed attempt is tried again on another instance: Spring Cloud Gateway's
/// `Retry` filter, typed.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Further attempts after the first.
    pub retries: usize,
    /// Methods retried after the request may have reached the upstream; others only
    /// with an `Idempotency-Key`. A connection that was never made is retried for any
    /// method, since the request never left.
    pub methods: Vec<Method>,
    /// Upstream statuses that count as a failed attempt.
    pub statuses: Vec<StatusCode>,
    /// Status classes that count as a failed attempt (`SERVER_ERROR` is 5).
    pub series: Vec<u8>,
    /// Which failures to get an answer are retried.
    pub exceptions: Vec<FailureKind>,
    pub backoff: Option<Backoff>,
    /// `jitter.randomFactor`: each pause moved at random by up to this share of it,
    /// staying within the backoff's bounds (0: none).
    pub jitter: f64,
    /// `timeout`: no retry whose pause would end past this long after the first
    /// attempt began (a bound on retrying, not on an attempt).
    pub timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    /// The gateway's own policy for routes without a `Retry` filter: two more
    /// attempts for safe methods, on a gateway status or a failure to get an answer.
    fn default() -> Self {
        Self {
            retries: 2,
            methods: vec![Method::GET, Method::HEAD, Method::OPTIONS],
            statuses: vec![
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
            ],
            series: Vec::new(),
            exceptions: vec![FailureKind::Io, FailureKind::Timeout],
            backoff: None,
            jitter: 0.0,
            timeout: None,
        }
    }
}

impl RetryPolicy {
    /// Whether an answer with `status` counts as a failed attempt.
    pub fn retries_status(&self, status: StatusCode) -> bool {
        self.statuses.contains(&status) || self.series.contains(&((status.as_u16() / 100) as u8))
    }

    /// Spring's `Retry` arguments, with Spring's defaults for what is not given:
    /// `retries` (3), `statuses` (none), `series` (`SERVER_ERROR`), `methods` (`GET`),
    /// `exceptions` (`IOException`, `TimeoutException`), `backoff` (none;
    /// `firstBackoff` 5ms, `maxBackoff` none, `factor` 2, `basedOnPreviousValue`
    /// true), `jitter.randomFactor` (none; 0 to 1) and `timeout` (none). The shortcut
    /// is Spring's order: retries, statuses, methods, the backoff's four, the jitter's
    /// factor, the timeout.
    pub fn from_args(
        args: &std::collections::BTreeMap<String, String>,
        positional: &[String],
    ) -> Result<Self, String> {
        const KNOWN: [&str; 11] = [
            "retries",
            "statuses",
            "series",
            "methods",
            "exceptions",
            "backoff.firstBackoff",
            "backoff.maxBackoff",
            "backoff.factor",
            "backoff.basedOnPreviousValue",
            "jitter.randomFactor",
            "timeout",
        ];
        let shortcut = crate::routes::shortcut_form(args);
        if !shortcut && let Some(unknown) = args.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!(
                "Retry has no argument {unknown}; use {}",
                KNOWN.join(", ")
            ));
        }
        let arg = |name: &str| -> Option<&str> {
            let raw = if shortcut {
                let order = [0, 1, 3, 5, 6, 7, 8, 9, 10];
                let at = KNOWN.iter().position(|k| *k == name)?;
                let index = order.iter().position(|i| *i == at)?;
                positional.get(index).map(String::as_str)
            } else {
                args.get(name).map(String::as_str)
            };
            raw.map(str::trim)
        };
        let list = |raw: &str| -> Vec<String> {
            raw.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let mut policy = Self {
            retries: 3,
            methods: vec![Method::GET],
            statuses: Vec::new(),
            series: vec![5],
            exceptions: vec![FailureKind::Io, FailureKind::Timeout],
            backoff: None,
            jitter: 0.0,
            timeout: None,
        };
        if let Some(retries) = arg("retries") {
            policy.retries = retries
                .parse()
                .map_err(|_| format!("retries must be a number, not {retries}"))?;
        }
        if let Some(statuses) = arg("statuses") {
            policy.statuses = list(statuses)
                .iter()
                .map(|s| crate::routes::status_arg(s))
                .collect::<Result<_, _>>()?;
        }
        if let Some(series) = arg("series") {
            policy.series = list(series)
                .iter()
                .map(|s| match s.as_str() {
                    "INFORMATIONAL" => Ok(1),
                    "SUCCESSFUL" => Ok(2),
                    "REDIRECTION" => Ok(3),
                    "CLIENT_ERROR" => Ok(4),
                    "SERVER_ERROR" => Ok(5),
                    other => Err(format!(
                        "series {other}: use INFORMATIONAL, SUCCESSFUL, REDIRECTION, CLIENT_ERROR or SERVER_ERROR"
                    )),
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(methods) = arg("methods") {
            policy.methods = list(methods)
                .iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| format!("{m} is not an HTTP method"))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(exceptions) = arg("exceptions") {
            policy.exceptions = list(exceptions)
                .iter()
                .map(|e| exception_kind(e))
                .collect::<Result<_, _>>()?;
        }
        let backoff = [
            "firstBackoff",
            "maxBackoff",
            "factor",
            "basedOnPreviousValue",
        ]
        .map(|name| arg(&format!("backoff.{name}")).filter(|v| !v.is_empty()));
        if backoff.iter().any(Option::is_some) {
            let [first, max, factor, _] = backoff;
            let first = first.map_or(Ok(Duration::from_millis(5)), duration)?;
            let max = max.map(duration).transpose()?;
            let factor = factor.map_or(Ok(2), |f| {
                f.parse::<u32>()
                    .ok()
                    .filter(|f| *f >= 1)
                    .ok_or_else(|| format!("backoff factor must be a whole number >= 1, not {f}"))
            })?;
            policy.backoff = Some(Backoff { first, max, factor });
        }
        if let Some(factor) = arg("jitter.randomFactor").filter(|v| !v.is_empty()) {
            policy.jitter = factor
                .parse::<f64>()
                .ok()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| {
                    format!("jitter.randomFactor must be a number from 0 to 1, not {factor}")
                })?;
        }
        if let Some(timeout) = arg("timeout").filter(|v| !v.is_empty()) {
            policy.timeout = Some(duration(timeout)?);
        }
        Ok(policy)
    }

    /// The pause before retry number `retry` (1 for the first), `elapsed` after the
    /// first attempt began: the backoff's, moved by the jitter (`draw` in [0, 1)
    /// picks where in its range), or `None` when the pause would end past the
    /// `timeout`, so the retry is not made. Spring checks the same way, before the
    /// pause.
    pub fn pause(&self, retry: usize, elapsed: Duration, draw: f64) -> Option<Duration> {
        let pause = self
            .backoff
            .as_ref()
            .map_or(Duration::ZERO, |b| b.jittered(retry, self.jitter, draw));
        match self.timeout {
            Some(timeout) if elapsed.saturating_add(pause) > timeout => None,
            _ => Some(pause),
        }
    }
}

/// The Java exception names Spring users write in `exceptions`, as our failures.
fn exception_kind(name: &str) -> Result<FailureKind, String> {
    match name {
        "java.io.IOException"
        | "java.net.ConnectException"
        | "java.net.SocketException"
        | "io.netty.channel.ConnectTimeoutException"
        | "org.springframework.cloud.gateway.support.NotFoundException" => Ok(FailureKind::Io),
        "java.util.concurrent.TimeoutException"
        | "org.springframework.cloud.gateway.support.TimeoutException"
        | "io.netty.handler.timeout.ReadTimeoutException" => Ok(FailureKind::Timeout),
        other => Err(format!(
            "exceptions: {other} is not one this gateway raises; use java.io.IOException or java.util.concurrent.TimeoutException"
        )),
    }
}

/// `10ms`, `2s`, `1m` or a bare number of milliseconds, as Spring reads a `Duration`.
fn duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, unit) = raw
        .find(|c: char| !c.is_ascii_digit())
        .map_or((raw, "ms"), |at| raw.split_at(at));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw} is not a duration such as 10ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{raw} is too long")),
        _ => Err(format!("{raw} is not a duration such as 10ms")),
    }
}

/// The pause before each retry: `first`, then multiplied by `factor` each time, never
/// above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Option<Duration>,
    pub factor: u32,
}

impl Backoff {
    /// The pause before retry number `retry` (1 for the first retry).
    pub fn before(&self, retry: usize) -> Duration {
        let exponent = u32::try_from(retry.saturating_sub(1)).unwrap_or(u32::MAX);
        let pause = self
            .first
            .saturating_mul(self.factor.saturating_pow(exponent));
        self.max.map_or(pause, |max| pause.min(max))
    }

    /// [`Backoff::before`] moved by up to `factor` of itself either way, drawn evenly
    /// from the part of that range between the first pause and the longest (`draw` in
    /// [0, 1) picks where), as reactor-extra's random jitter draws: the first pause
    /// only ever grows.
    pub fn jittered(&self, retry: usize, factor: f64, draw: f64) -> Duration {
        let pause = self.before(retry);
        if factor <= 0.0 {
            return pause;
        }
        let (at, spread) = (pause.as_secs_f64(), pause.as_secs_f64() * factor);
        let low = (self.first.as_secs_f64() - at).max(-spread);
        let high = self
            .max
            .map_or(spread, |max| (max.as_secs_f64() - at).min(spread));
        let moved = at + low + (high - low).max(0.0) * draw.clamp(0.0, 1.0);
        Duration::try_from_secs_f64(moved.max(0.0)).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_carries_the_requests_parameters_as_spring_rebuilds_them() {
        let redirect = |url: &str| Redirect {
            status: StatusCode::FOUND,
            url: HeaderValue::from_str(url).expect("url"),
            include_request_params: true,
        };
        let to = redirect("https://x.test/new?from=gw&b=0#top");
        for (query, location) in [
            (None, "https://x.test/new?from=gw&b=0#top"),
            (Some(""), "https://x.test/new?from=gw&b=0#top"),
            (Some("&=&"), "https://x.test/new?from=gw&b=0#top"),
            (
                Some("b=1&a=2&b=3&flag&empty="),
                "https://x.test/new?from=gw&b=0&b=1&b=3&a=2&flag&empty=#top",
            ),
            (
                Some("sp=a+b%20c&pct=100%25"),
                "https://x.test/new?from=gw&b=0&sp=a%20b%20c&pct=100%25#top",
            ),
            (
                Some("amp=x%26y&q=%3Chi%3E"),
                "https://x.test/new?from=gw&b=0&amp=x&y&q=%3Chi%3E#top",
            ),
            (Some("==x=1&&"), "https://x.test/new?from=gw&b=0&x=1#top"),
            (
                Some("caf%C3%A9=1"),
                "https://x.test/new?from=gw&b=0&caf%C3%A9=1#top",
            ),
        ] {
            assert_eq!(to.location(query), location, "{query:?}");
        }
        assert_eq!(
            redirect("https://x.test/new").location(Some("a=1")),
            "https://x.test/new?a=1"
        );
        assert_eq!(
            redirect("https://x.test/new").location(Some("&=")),
            "https://x.test/new",
            "no parameter: no `?`"
        );
    }

    fn args(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_retry_filter_starts_from_springs_defaults() {
        let policy = RetryPolicy::from_args(&args(&[]), &[]).unwrap();
        assert_eq!(policy.retries, 3);
        assert_eq!(policy.methods, vec![Method::GET]);
        assert!(policy.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!policy.retries_status(StatusCode::NOT_FOUND));
        assert_eq!(policy.backoff, None);
    }

    #[test]
    fn retry_arguments_are_typed_in_either_form() {
        let full = RetryPolicy::from_args(
            &args(&[
                ("retries", "1"),
                ("statuses", "NOT_FOUND, 409"),
                ("series", ""),
                ("methods", "get,post"),
                ("exceptions", "java.util.concurrent.TimeoutException"),
                ("backoff.firstBackoff", "10ms"),
                ("backoff.maxBackoff", "25ms"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(full.retries, 1);
        assert_eq!(
            full.statuses,
            vec![StatusCode::NOT_FOUND, StatusCode::CONFLICT]
        );
        assert!(
            !full.retries_status(StatusCode::BAD_GATEWAY),
            "series emptied"
        );
        assert_eq!(full.methods, vec![Method::GET, Method::POST]);
        assert_eq!(full.exceptions, vec![FailureKind::Timeout]);
        let backoff = full.backoff.unwrap();
        assert_eq!(backoff.before(1), Duration::from_millis(10));
        assert_eq!(backoff.before(2), Duration::from_millis(20));
        assert_eq!(backoff.before(3), Duration::from_millis(25), "capped");

        let positional: Vec<String> = ["2", "BAD_GATEWAY", "GET,PUT", "5ms"]
            .map(String::from)
            .to_vec();
        let shortcut = RetryPolicy::from_args(
            &args(&[
                ("_genkey_0", "2"),
                ("_genkey_1", "BAD_GATEWAY"),
                ("_genkey_2", "GET,PUT"),
                ("_genkey_3", "5ms"),
            ]),
            &positional,
        )
        .unwrap();
        assert_eq!(shortcut.retries, 2);
        assert_eq!(shortcut.statuses, vec![StatusCode::BAD_GATEWAY]);
        assert_eq!(shortcut.methods, vec![Method::GET, Method::PUT]);
        assert_eq!(shortcut.backoff.unwrap().first, Duration::from_millis(5));
    }

    #[test]
    fn jitter_moves_a_pause_within_its_bounds_and_a_timeout_stops_retrying() {
        let positional: Vec<String> = ["3", "", "GET", "100ms", "300ms", "2", "false", "0.5", "1s"]
            .map(String::from)
            .to_vec();
        let keys: Vec<(String, String)> = positional
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("_genkey_{i}"), v.clone()))
            .collect();
        let policy = RetryPolicy::from_args(&keys.into_iter().collect(), &positional).unwrap();
        assert_eq!(policy.jitter, 0.5);
        assert_eq!(policy.timeout, Some(Duration::from_secs(1)));
        let ms = Duration::from_millis;
        // The second pause is 200ms: moved by up to 100ms either way.
        assert_eq!(policy.pause(2, ms(0), 0.0), Some(ms(100)));
        assert_eq!(policy.pause(2, ms(0), 0.5), Some(ms(200)));
        assert_eq!(
            policy.pause(2, ms(0), 0.999_999).map(|d| d.as_millis()),
            Some(299)
        );
        // Drawn only from what lies between the first pause and the longest: the
        // first pause (100ms) moves up to 150ms, the third (300ms, the longest) down
        // to 150ms.
        assert_eq!(policy.pause(1, ms(0), 0.0), Some(ms(100)));
        assert_eq!(policy.pause(1, ms(0), 0.5), Some(ms(125)));
        assert_eq!(policy.pause(3, ms(0), 0.0), Some(ms(150)));
        assert_eq!(
            policy.pause(3, ms(0), 0.999_999).map(|d| d.as_millis()),
            Some(299)
        );
        // A pause that would end past the timeout is no retry.
        assert_eq!(policy.pause(2, ms(799), 0.5), Some(ms(200)));
        assert_eq!(policy.pause(2, ms(801), 0.5), None);
        // Without a backoff a retry has no pause, and only the timeout's end counts.
        let bare = RetryPolicy::from_args(&args(&[("timeout", "50ms")]), &[]).unwrap();
        assert_eq!(bare.pause(1, ms(50), 0.5), Some(Duration::ZERO));
        assert_eq!(bare.pause(1, ms(51), 0.5), None);
    }

    #[test]
    fn retry_refuses_what_it_does_not_know_by_name() {
        let unknown = RetryPolicy::from_args(&args(&[("maxAttempts", "1")]), &[]).unwrap_err();
        assert!(unknown.contains("maxAttempts"), "{unknown}");
        let jitter =
            RetryPolicy::from_args(&args(&[("jitter.randomFactor", "1.5")]), &[]).unwrap_err();
        assert!(jitter.contains("from 0 to 1"), "{jitter}");
        let timeout = RetryPolicy::from_args(&args(&[("timeout", "soon")]), &[]).unwrap_err();
        assert!(timeout.contains("soon"), "{timeout}");
        let exception =
            RetryPolicy::from_args(&args(&[("exceptions", "java.lang.Error")]), &[]).unwrap_err();
        assert!(exception.contains("java.lang.Error"), "{exception}");
        let series = RetryPolicy::from_args(&args(&[("series", "5XX")]), &[]).unwrap_err();
        assert!(series.contains("SERVER_ERROR"), "{series}");
    }

    #[test]
    fn the_plan_keeps_each_stages_filters_in_written_order() {
        let filters = vec![
            Filter::Response(ResponseEdit::SecureHeaders),
            Filter::Path(PathEdit::Strip(1)),
            Filter::RequestSize(10),
            Filter::Path(PathEdit::Prefix("/api".into())),
            Filter::RequestSize(20),
            Filter::RequestHeader(HeaderEdit::Add(
                HeaderName::from_static("x-segment"),
                HeaderValue::from_static("{segment}"),
            )),
        ];
        let plan = Plan::of(&filters);
        assert_eq!(plan.body_limit, Some(10), "the smaller limit holds");
        assert_eq!(
            PathEdit::apply_all(&plan.path, "/orders/1", &[]).as_deref(),
            Some("/api/1")
        );
        assert!(plan.templated);
        assert_eq!(plan.response.len(), 1);
        assert!(plan.redirect.is_none() && plan.breaker.is_none());
    }

    #[test]
    fn query_keys_are_compared_decoded() {
        assert_eq!(decode_query("%64ebug"), "debug");
        assert_eq!(decode_query("a+b%20c"), "a b c");
        assert_eq!(decode_query("100%"), "100%");
        assert_eq!(decode_query("%zz"), "%zz");
        assert_eq!(decode_query("abc=="), "abc==", "base64 padding stays");
    }

    #[test]
    fn secure_headers_keep_what_the_upstream_set() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("SAMEORIGIN"),
        );
        secure_headers(&mut headers);
        assert_eq!(headers[header::X_FRAME_OPTIONS], "SAMEORIGIN");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers.len(), SECURE_HEADERS.len());
    }
}
