package org.fhirbilling.hapiserver;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.context.annotation.Import;

/**
 * Entry point of the end-to-end test FHIR server.
 *
 * <p>HAPI's own Spring configuration does the heavy lifting: {@link JpaR4Config} brings the R4 JPA
 * DAOs and resource providers, the three subscription configs bring the submit / match / deliver
 * pipeline (rest-hook delivery among it), and the batch2 configs provide the job framework that
 * JpaConfig expects. Everything we must supply ourselves lives in {@link HapiBeans} and
 * {@link FhirServletConfig}.
 *
 * <p>Auto-configurations that would latch on to libraries HAPI drags onto the classpath
 * (Quartz, Thymeleaf, Elasticsearch, Flyway) are switched off; HAPI runs its own scheduler.
 */
@SpringBootApplication(
		excludeName = {
			"org.springframework.boot.autoconfigure.quartz.QuartzAutoConfiguration",
			"org.springframework.boot.autoconfigure.thymeleaf.ThymeleafAutoConfiguration",
			"org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration",
			"org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchClientAutoConfiguration",
			"org.springframework.boot.autoconfigure.data.elasticsearch.ElasticsearchDataAutoConfiguration",
			"org.springframework.boot.autoconfigure.data.elasticsearch.ElasticsearchRepositoriesAutoConfiguration",
			"org.springframework.boot.autoconfigure.flyway.FlywayAutoConfiguration"
		})
@Import({
	JpaR4Config.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	SubscriptionSubmitterConfig.class,
	SubscriptionProcessorConfig.class,
	SubscriptionChannelConfig.class
})
public class TestServerApplication {

	public static void main(String[] args) {
		SpringApplication.run(TestServerApplication.class, args);
	}
}
