package storefront.interop;

import java.util.List;

import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.context.annotation.Bean;
import org.springframework.security.config.Customizer;
import org.springframework.security.config.web.server.ServerHttpSecurity;
import org.springframework.security.oauth2.core.DelegatingOAuth2TokenValidator;
import org.springframework.security.oauth2.jwt.JwtClaimValidator;
import org.springframework.security.oauth2.jwt.JwtValidators;
import org.springframework.security.oauth2.jwt.NimbusReactiveJwtDecoder;
import org.springframework.security.oauth2.jwt.ReactiveJwtDecoder;
import org.springframework.security.web.server.SecurityWebFilterChain;
import org.springframework.security.web.server.context.NoOpServerSecurityContextRepository;
import org.springframework.security.web.server.savedrequest.NoOpServerRequestCache;

/**
 * Spring Cloud Gateway as a Spring Cloud shop runs it: routes from properties,
 * instances from Eureka through Spring Cloud LoadBalancer, and every request but
 * health carrying a bearer token that Spring Security's OAuth2 resource server checks
 * against the issuer's JWK set: signature, expiry, not-before, issuer and audience.
 *
 * <p>Properties: {@code spring.security.oauth2.resourceserver.jwt.jwk-set-uri} and
 * {@code spring.security.oauth2.resourceserver.jwt.audiences} (Spring Boot's own
 * names) and {@code storefront.jwt.issuer}, the exact {@code iss} expected.
 */
@SpringBootApplication
public class GatewayApp {
    public static void main(String[] args) {
        SpringApplication.run(GatewayApp.class, args);
    }

    /** Stateless bearer-token security: no session, no saved requests, no CSRF. */
    @Bean
    SecurityWebFilterChain security(ServerHttpSecurity http) {
        return http
                .authorizeExchange(exchanges -> exchanges
                        .pathMatchers("/actuator/health", "/actuator/health/**").permitAll()
                        .anyExchange().authenticated())
                .oauth2ResourceServer(server -> server.jwt(Customizer.withDefaults()))
                .securityContextRepository(NoOpServerSecurityContextRepository.getInstance())
                .requestCache(cache -> cache.requestCache(NoOpServerRequestCache.getInstance()))
                .csrf(ServerHttpSecurity.CsrfSpec::disable)
                .build();
    }

    /**
     * The resource server's decoder for EdDSA tokens. Spring Boot would build one from
     * the JWK set URI alone, but only for RSA and EC keys: Spring Security's decoder
     * turns no Ed25519 (OKP) key into a verification key (spring-security#17098), so a
     * Spring shop with an EdDSA issuer plugs in its own signature check, as here, and
     * keeps Spring's claim validation.
     */
    @Bean
    ReactiveJwtDecoder jwtDecoder(
            @Value("${spring.security.oauth2.resourceserver.jwt.jwk-set-uri}") String jwkSetUri,
            @Value("${spring.security.oauth2.resourceserver.jwt.audiences}") List<String> audiences,
            @Value("${storefront.jwt.issuer}") String issuer) {
        NimbusReactiveJwtDecoder decoder =
                new NimbusReactiveJwtDecoder(new Ed25519JwtProcessor(jwkSetUri));
        decoder.setJwtValidator(new DelegatingOAuth2TokenValidator<>(
                JwtValidators.createDefaultWithIssuer(issuer),
                new JwtClaimValidator<List<String>>(
                        "aud", aud -> aud != null && aud.stream().anyMatch(audiences::contains))));
        return decoder;
    }
}
