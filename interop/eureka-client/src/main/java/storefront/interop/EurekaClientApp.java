package storefront.interop;

import java.util.List;
import java.util.Map;

import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.cloud.client.ServiceInstance;
import org.springframework.cloud.client.discovery.DiscoveryClient;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.PathVariable;
import org.springframework.web.bind.annotation.RequestHeader;
import org.springframework.web.bind.annotation.RestController;

/**
 * A Spring Boot service as a Spring Cloud shop writes one: it registers with Eureka
 * through spring-cloud-starter-netflix-eureka-client and reads the registry through
 * Spring's DiscoveryClient. Nothing in it knows that the registry is not Netflix's.
 */
@SpringBootApplication
@RestController
public class EurekaClientApp {

    private final DiscoveryClient discovery;
    private final String name;
    private final int port;

    public EurekaClientApp(
            DiscoveryClient discovery,
            @Value("${spring.application.name}") String name,
            @Value("${server.port}") int port) {
        this.discovery = discovery;
        this.name = name;
        this.port = port;
    }

    public static void main(String[] args) {
        SpringApplication.run(EurekaClientApp.class, args);
    }

    /** Who answered, and what the gateway sent along. */
    @GetMapping("/hello")
    public Map<String, Object> hello(
            @RequestHeader(value = "X-Forwarded-Prefix", required = false) String prefix) {
        return Map.of("app", name, "port", port, "forwardedPrefix", prefix == null ? "" : prefix);
    }

    /** Every service the registry lists as UP, as Spring's DiscoveryClient sees them. */
    @GetMapping("/services")
    public List<String> services() {
        return discovery.getServices();
    }

    /** One service's instances (host:port), as Spring's DiscoveryClient sees them. */
    @GetMapping("/services/{service}")
    public List<String> instances(@PathVariable String service) {
        return discovery.getInstances(service).stream()
                .map(ServiceInstance::getUri)
                .map(Object::toString)
                .toList();
    }
}
