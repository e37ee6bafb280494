package storefront.interop;

import java.net.MalformedURLException;
import java.net.URI;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;

import com.nimbusds.jose.JOSEException;
import com.nimbusds.jose.JWSAlgorithm;
import com.nimbusds.jose.crypto.Ed25519Verifier;
import com.nimbusds.jose.jwk.Curve;
import com.nimbusds.jose.jwk.JWK;
import com.nimbusds.jose.jwk.JWKMatcher;
import com.nimbusds.jose.jwk.JWKSelector;
import com.nimbusds.jose.jwk.KeyType;
import com.nimbusds.jose.jwk.OctetKeyPair;
import com.nimbusds.jose.jwk.source.JWKSource;
import com.nimbusds.jose.jwk.source.JWKSourceBuilder;
import com.nimbusds.jose.proc.SecurityContext;
import com.nimbusds.jwt.JWT;
import com.nimbusds.jwt.JWTClaimsSet;
import com.nimbusds.jwt.SignedJWT;

import org.springframework.core.convert.converter.Converter;
import org.springframework.security.oauth2.jwt.BadJwtException;

import reactor.core.publisher.Mono;

/**
 * Checks an EdDSA (Ed25519) signature with Nimbus's {@link Ed25519Verifier} (which runs
 * on Google Tink, as Nimbus documents) against the key the token's {@code kid} names in
 * a remote JWK set, which Nimbus's {@link JWKSourceBuilder} fetches and caches
 * (refetching on an unknown key, rate limited). Returns the claims for Spring's
 * validators.
 */
final class Ed25519JwtProcessor implements Converter<JWT, Mono<JWTClaimsSet>> {

    private final JWKSource<SecurityContext> keys;
    /** One verifier per public key, by its {@code x}. */
    private final Map<String, Ed25519Verifier> verifiers = new ConcurrentHashMap<>();

    Ed25519JwtProcessor(String jwkSetUri) {
        try {
            this.keys = JWKSourceBuilder.create(URI.create(jwkSetUri).toURL()).build();
        } catch (MalformedURLException e) {
            throw new IllegalArgumentException("bad JWK set URI " + jwkSetUri, e);
        }
    }

    @Override
    public Mono<JWTClaimsSet> convert(JWT jwt) {
        return Mono.fromCallable(() -> verify(jwt));
    }

    private JWTClaimsSet verify(JWT jwt) throws Exception {
        if (!(jwt instanceof SignedJWT signed)
                || !JWSAlgorithm.EdDSA.equals(signed.getHeader().getAlgorithm())) {
            throw new BadJwtException("not an EdDSA-signed token");
        }
        String kid = signed.getHeader().getKeyID();
        List<JWK> matches = keys.get(
                new JWKSelector(new JWKMatcher.Builder()
                        .keyType(KeyType.OKP)
                        .curve(Curve.Ed25519)
                        .keyID(kid)
                        .build()),
                null);
        if (matches.isEmpty()) {
            throw new BadJwtException("no Ed25519 key " + kid + " in the JWK set");
        }
        if (!signed.verify(verifier((OctetKeyPair) matches.get(0)))) {
            throw new BadJwtException("bad signature");
        }
        return signed.getJWTClaimsSet();
    }

    private Ed25519Verifier verifier(OctetKeyPair key) throws JOSEException {
        Ed25519Verifier known = verifiers.get(key.getX().toString());
        if (known != null) {
            return known;
        }
        Ed25519Verifier verifier = new Ed25519Verifier(key.toPublicJWK());
        verifiers.put(key.getX().toString(), verifier);
        return verifier;
    }
}
