//! Token verification: every way a token can be wrong, key rotation at a real JWKS
//! URL, bounded refetching, and keeping the last good keys when the issuer is down.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use shared::auth::{
    Audience, AuthError, Claims, IssuerSettings, JwtVerifier, TokenSigner, VerifierSettings,
};

const ISSUER: &str = "https://id.example.test";
const AUDIENCE: &str = "storefront";

fn signer(issuer: &str, audience: &str) -> TokenSigner {
    TokenSigner::from_seed_base64(
        &TokenSigner::generate_seed(),
        issuer,
        audience,
        Duration::from_secs(300),
    )
    .expect("seed")
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(issuer: &str, audience: &str) -> Claims {
    Claims {
        sub: "alice".into(),
        roles: vec!["customer".into()],
        iss: issuer.into(),
        aud: Audience::One(audience.into()),
        iat: now(),
        exp: now() + 300,
        nbf: None,
    }
}

/// A JWKS endpoint whose keys can be swapped, that counts fetches and can fail.
#[derive(Clone)]
struct Jwks {
    keys: Arc<ArcSwap<Value>>,
    fetches: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    url: String,
}

async fn jwks_server(initial: Value) -> Jwks {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().expect("addr")
    );
    let jwks = Jwks {
        keys: Arc::new(ArcSwap::from_pointee(initial)),
        fetches: Arc::new(AtomicUsize::new(0)),
        down: Arc::new(AtomicBool::new(false)),
        url,
    };
    async fn serve(State(jwks): State<Jwks>) -> Result<Json<Value>, StatusCode> {
        jwks.fetches.fetch_add(1, Ordering::SeqCst);
        if jwks.down.load(Ordering::SeqCst) {
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
        Ok(Json((**jwks.keys.load()).clone()))
    }
    let app = Router::new()
        .route("/.well-known/jwks.json", get(serve))
        .with_state(jwks.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    jwks
}

fn verifier(jwks_url: &str, refetch_ms: u64) -> JwtVerifier {
    JwtVerifier::new(&VerifierSettings {
        issuers: vec![issuer(jwks_url, &[("customer", "customer")])],
        leeway_seconds: 30,
        refetch_interval_ms: refetch_ms,
        ..VerifierSettings::default()
    })
    .expect("verifier")
}

/// The test issuer at `jwks_url`, granting our roles as `role_map` says.
fn issuer(jwks_url: &str, role_map: &[(&str, &str)]) -> IssuerSettings {
    IssuerSettings {
        issuer: ISSUER.into(),
        jwks_url: Some(jwks_url.into()),
        audiences: vec![AUDIENCE.into()],
        algorithms: vec!["EdDSA".into()],
        role_map: role_map
            .iter()
            .map(|(theirs, ours)| ((*theirs).to_owned(), (*ours).to_owned()))
            .collect(),
        keep_roles: false,
    }
}

/// A token with the given header and claims, "signed" by `sign` over its first parts.
fn forge(header: Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let head = URL_SAFE_NO_PAD.encode(header.to_string());
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = URL_SAFE_NO_PAD.encode(sign(format!("{head}.{body}").as_bytes()));
    format!("{head}.{body}.{signature}")
}

#[tokio::test]
async fn a_good_token_from_a_jwks_issuer_is_accepted() {
    let key = signer(ISSUER, AUDIENCE);
    let jwks = jwks_server(key.jwks()).await;
    let verifier = verifier(&jwks.url, 10_000);
    let token = key.sign("alice", &["customer".into()]).expect("sign");
    let claims = verifier.verify(&token).await.expect("accepted");
    assert_eq!(claims.sub, "alice");
    assert!(claims.has_role("customer"));
    assert!(!claims.is_admin());
}

#[tokio::test]
async fn the_gateways_own_tokens_verify_without_any_fetch() {
    let key = signer("gateway", AUDIENCE);
    let mut verifier = JwtVerifier::new(&VerifierSettings::default()).expect("verifier");
    verifier.trust_signer(&key);
    let token = key.sign("bob", &["admin".into()]).expect("sign");
    assert!(verifier.verify(&token).await.expect("accepted").is_admin());
}

#[tokio::test]
async fn every_kind_of_bad_token_is_refused_with_its_reason() {
    let key = signer(ISSUER, AUDIENCE);
    let jwks = jwks_server(key.jwks()).await;
    let verifier = verifier(&jwks.url, 10_000);
    let good = serde_json::to_value(claims(ISSUER, AUDIENCE)).expect("claims");
    let kid = key.kid().to_owned();

    // alg=none: no signature at all.
    let none = forge(
        json!({"alg": "none", "typ": "JWT", "kid": kid}),
        &good,
        |_| Vec::new(),
    );
    assert!(matches!(
        verifier.verify(&none).await,
        Err(AuthError::Algorithm | AuthError::Malformed)
    ));

    // HMAC "signed" with the issuer's public key, the classic key-confusion attack.
    let public = URL_SAFE_NO_PAD
        .decode(key.jwk()["x"].as_str().expect("x"))
        .expect("public key");
    let hmac = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some(kid.clone()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
        },
        &good,
        &jsonwebtoken::EncodingKey::from_secret(&public),
    )
    .expect("hmac token");
    assert_eq!(verifier.verify(&hmac).await, Err(AuthError::Algorithm));

    let mut expired = claims(ISSUER, AUDIENCE);
    expired.iat = now() - 600;
    expired.exp = now() - 120;
    let token = key.sign_claims(&expired).expect("sign");
    assert_eq!(verifier.verify(&token).await, Err(AuthError::Expired));

    let mut skewed = claims(ISSUER, AUDIENCE);
    skewed.exp = now() - 10;
    let token = key.sign_claims(&skewed).expect("sign");
    assert!(
        verifier.verify(&token).await.is_ok(),
        "a few seconds of clock skew are allowed"
    );

    let mut future = claims(ISSUER, AUDIENCE);
    future.nbf = Some(now() + 120);
    let token = key.sign_claims(&future).expect("sign");
    assert_eq!(verifier.verify(&token).await, Err(AuthError::NotYetValid));

    let stranger = signer("https://evil.example.test", AUDIENCE);
    let token = stranger.sign("alice", &[]).expect("sign");
    assert_eq!(
        verifier.verify(&token).await,
        Err(AuthError::UntrustedIssuer)
    );

    let token = key
        .sign_claims(&claims(ISSUER, "someone-else"))
        .expect("sign");
    assert_eq!(verifier.verify(&token).await, Err(AuthError::Audience));

    // Change the payload (alice becomes admin), keep the signature.
    let token = key.sign("alice", &["customer".into()]).expect("sign");
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
    payload["roles"] = json!(["admin"]);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        parts[2]
    );
    assert_eq!(verifier.verify(&tampered).await, Err(AuthError::Signature));

    assert_eq!(
        verifier.verify("not.a.jwt").await,
        Err(AuthError::Malformed)
    );

    // A subject no service can own anything by, however well signed.
    for sub in [
        String::new(),
        "al\u{0}ice".into(),
        "a\nb".into(),
        "a".repeat(256),
    ] {
        let mut odd = claims(ISSUER, AUDIENCE);
        odd.sub = sub.clone();
        let token = key.sign_claims(&odd).expect("sign");
        assert_eq!(
            verifier.verify(&token).await,
            Err(AuthError::Subject),
            "sub {sub:?}"
        );
    }
    let mut longest = claims(ISSUER, AUDIENCE);
    longest.sub = "é".repeat(255);
    let token = key.sign_claims(&longest).expect("sign");
    assert!(
        verifier.verify(&token).await.is_ok(),
        "255 characters are a subject"
    );
}

#[tokio::test]
async fn an_unknown_kid_refetches_so_a_rotated_key_is_accepted() {
    let old = signer(ISSUER, AUDIENCE);
    let jwks = jwks_server(old.jwks()).await;
    let verifier = verifier(&jwks.url, 0);
    assert!(
        verifier
            .verify(&old.sign("a", &[]).expect("sign"))
            .await
            .is_ok()
    );

    let new = signer(ISSUER, AUDIENCE);
    let rotated = new.sign("a", &[]).expect("sign");
    // Not published yet: unknown.
    assert_eq!(verifier.verify(&rotated).await, Err(AuthError::UnknownKey));
    // The issuer publishes the new key beside the old one.
    jwks.keys
        .store(Arc::new(json!({ "keys": [old.jwk(), new.jwk()] })));
    assert!(
        verifier.verify(&rotated).await.is_ok(),
        "picked up on refetch"
    );
    assert!(
        verifier
            .verify(&old.sign("a", &[]).expect("sign"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn unknown_kids_cannot_make_the_verifier_hammer_the_issuer() {
    let key = signer(ISSUER, AUDIENCE);
    let jwks = jwks_server(key.jwks()).await;
    let verifier = verifier(&jwks.url, 60_000);
    assert!(
        verifier
            .verify(&key.sign("a", &[]).expect("sign"))
            .await
            .is_ok()
    );
    let fetched = jwks.fetches.load(Ordering::SeqCst);
    for _ in 0..50 {
        let stranger_key = signer(ISSUER, AUDIENCE);
        let token = stranger_key.sign("a", &[]).expect("sign");
        assert_eq!(verifier.verify(&token).await, Err(AuthError::UnknownKey));
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        fetched,
        "no refetch within the interval"
    );
}

#[tokio::test]
async fn the_last_good_keys_stay_when_the_issuer_is_down() {
    let key = signer(ISSUER, AUDIENCE);
    let jwks = jwks_server(key.jwks()).await;
    let verifier = verifier(&jwks.url, 0);
    assert!(
        verifier
            .verify(&key.sign("a", &[]).expect("sign"))
            .await
            .is_ok()
    );

    jwks.down.store(true, Ordering::SeqCst);
    // An unknown kid triggers a fetch, which fails...
    let before = jwks.fetches.load(Ordering::SeqCst);
    let stranger = signer(ISSUER, AUDIENCE);
    assert_eq!(
        verifier
            .verify(&stranger.sign("a", &[]).expect("sign"))
            .await,
        Err(AuthError::UnknownKey)
    );
    assert!(jwks.fetches.load(Ordering::SeqCst) > before, "it did try");
    // ...and the keys it had still verify.
    assert!(
        verifier
            .verify(&key.sign("a", &[]).expect("sign"))
            .await
            .is_ok()
    );
}

#[test]
fn hmac_issuers_are_refused_at_start_up() {
    let err = JwtVerifier::new(&VerifierSettings {
        issuers: vec![IssuerSettings {
            jwks_url: None,
            algorithms: vec!["HS256".into()],
            ..issuer("", &[])
        }],
        ..VerifierSettings::default()
    })
    .unwrap_err();
    assert!(err.contains("HMAC"), "{err}");
}

#[tokio::test]
async fn the_extractor_answers_401_problems_with_a_bearer_challenge() {
    use axum::{body::Body, http::Request};
    use shared::auth::AuthUser;
    use tower::ServiceExt;

    let key = signer("gateway", AUDIENCE);
    let mut verifier = JwtVerifier::new(&VerifierSettings::default()).expect("verifier");
    verifier.trust_signer(&key);
    let app = Router::new()
        .route(
            "/me",
            get(|AuthUser(claims): AuthUser| async move { claims.sub }),
        )
        .with_state(Arc::new(verifier));

    let missing = app
        .clone()
        .oneshot(Request::get("/me").body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );

    let bad = app
        .clone()
        .oneshot(
            Request::get("/me")
                .header("authorization", "Bearer not.a.jwt")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    assert!(
        bad.headers()["www-authenticate"]
            .to_str()
            .unwrap_or_default()
            .contains("invalid_token")
    );

    let token = key.sign("carol", &[]).expect("sign");
    let ok = app
        .oneshot(
            Request::get("/me")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn concurrent_first_requests_share_one_fetch_and_all_pass() {
    let key = signer(ISSUER, AUDIENCE);
    let jwks = jwks_server(key.jwks()).await;
    let verifier = Arc::new(verifier(&jwks.url, 60_000));
    let token = key.sign("a", &[]).expect("sign");
    let checks: Vec<_> = (0..8)
        .map(|_| {
            let verifier = verifier.clone();
            let token = token.clone();
            tokio::spawn(async move { verifier.verify(&token).await })
        })
        .collect();
    for check in checks {
        assert!(
            check.await.expect("join").is_ok(),
            "no request refused while the keys load"
        );
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "one fetch for all of them"
    );
}

#[tokio::test]
async fn a_cached_token_still_expires_and_a_tampered_one_is_not_served_from_the_cache() {
    let key = TokenSigner::from_seed_base64(
        &TokenSigner::generate_seed(),
        "gateway",
        AUDIENCE,
        Duration::from_secs(1),
    )
    .expect("seed");
    let mut verifier = JwtVerifier::new(&VerifierSettings {
        leeway_seconds: 0,
        ..VerifierSettings::default()
    })
    .expect("verifier");
    verifier.trust_signer(&key);
    let token = key.sign("alice", &["customer".into()]).expect("sign");
    // Verified once, then answered from the cache.
    for _ in 0..2 {
        assert_eq!(
            verifier.verify(&token).await.expect("accepted").sub,
            "alice"
        );
    }
    let (head, _) = token.rsplit_once('.').expect("three parts");
    let tampered = format!("{head}.{}", URL_SAFE_NO_PAD.encode([7u8; 64]));
    assert_eq!(
        verifier.verify(&tampered).await.unwrap_err(),
        AuthError::Signature
    );
    let exp = verifier.verify(&token).await.expect("accepted").exp;
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        verifier.verify(&token).await.unwrap_err(),
        AuthError::Expired
    );
}

#[tokio::test]
async fn a_key_the_issuer_withdrew_stops_being_trusted() {
    let old = signer(ISSUER, AUDIENCE);
    let new = signer(ISSUER, AUDIENCE);
    let jwks = jwks_server(old.jwks()).await;
    let verifier = JwtVerifier::new(&VerifierSettings {
        issuers: vec![issuer(&jwks.url, &[])],
        refresh_interval_ms: 100,
        ..VerifierSettings::default()
    })
    .expect("verifier");
    assert!(
        verifier
            .verify(&old.sign("a", &[]).expect("sign"))
            .await
            .is_ok()
    );
    // The issuer rotates: the old key is withdrawn, not just joined by a new one.
    jwks.keys.store(Arc::new(new.jwks()));
    let mut n = 0;
    shared::testing::eventually(
        Duration::from_secs(10),
        "a token of the withdrawn key is refused",
        async || {
            n += 1;
            // A new subject each time: a token verified before is answered from the
            // cache for up to a minute, which is the documented bound.
            let fresh = old.sign(&format!("user-{n}"), &[]).expect("sign");
            (verifier.verify(&fresh).await == Err(AuthError::UnknownKey)).then_some(())
        },
    )
    .await;
    assert!(
        verifier
            .verify(&new.sign("b", &[]).expect("sign"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_external_issuer_grants_only_the_roles_its_map_names() {
    let key = signer(ISSUER, AUDIENCE);
    let jwks = jwks_server(key.jwks()).await;
    let token = key
        .sign(
            "eve",
            &["admin".into(), "customer".into(), "store-admins".into()],
        )
        .expect("sign");
    let plain = JwtVerifier::new(&VerifierSettings {
        issuers: vec![issuer(&jwks.url, &[("customer", "customer")])],
        ..VerifierSettings::default()
    })
    .expect("verifier");
    let claims = plain.verify(&token).await.expect("accepted");
    assert_eq!(
        claims.roles,
        vec!["customer".to_owned()],
        "its `admin` is not ours"
    );
    let mapped = JwtVerifier::new(&VerifierSettings {
        issuers: vec![issuer(&jwks.url, &[("store-admins", "admin")])],
        ..VerifierSettings::default()
    })
    .expect("verifier");
    let claims = mapped.verify(&token).await.expect("accepted");
    assert_eq!(claims.roles, vec!["admin".to_owned()]);
}

#[tokio::test]
async fn a_jwks_that_redirects_or_is_too_large_is_not_used() {
    let key = signer(ISSUER, AUDIENCE);
    let real = jwks_server(key.jwks()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let target = real.url.clone();
    let mut huge = key.jwks();
    huge["padding"] = json!("x".repeat(shared::auth::MAX_JWKS_BYTES));
    let app = Router::new()
        .route(
            "/redirect",
            get(move || {
                let target = target.clone();
                async move { axum::response::Redirect::temporary(&target) }
            }),
        )
        .route("/huge", get(move || async move { Json(huge.clone()) }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    for path in ["/redirect", "/huge"] {
        let verifier = JwtVerifier::new(&VerifierSettings {
            issuers: vec![issuer(&format!("{base}{path}"), &[])],
            ..VerifierSettings::default()
        })
        .expect("verifier");
        assert_eq!(
            verifier.verify(&key.sign("a", &[]).expect("sign")).await,
            Err(AuthError::UnknownKey),
            "{path}"
        );
    }
    assert_eq!(
        real.fetches.load(Ordering::SeqCst),
        0,
        "the redirect was not followed"
    );
}
