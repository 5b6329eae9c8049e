package org.fhirbilling.hapiserver;

import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.provider.SubscriptionTriggeringProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.narrative.INarrativeGenerator;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.ETagSupportEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.Meta;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

/**
 * The FHIR REST endpoint: one HAPI {@link RestfulServer} servlet mounted on {@code /fhir/*}.
 */
@Configuration
public class FhirServletConfig {

	@Bean
	public RestfulServer fhirRestfulServer(
			FhirContext fhirContext,
			IFhirSystemDao<Bundle, Meta> systemDao,
			JpaSystemProvider<Bundle, Meta> systemProvider,
			ResourceProviderFactory resourceProviderFactory,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider,
			SubscriptionTriggeringProvider subscriptionTriggeringProvider,
			BulkDataExportProvider bulkDataExportProvider,
			TestServerProperties props) {
		// No narratives: keeps responses small and avoids Thymeleaf work on every write.
		fhirContext.setNarrativeGenerator((INarrativeGenerator) null);
		// Keep the versions the adapter's Provenance names (HAPI's parser strips them by default).
		fhirContext.getParserOptions().setDontStripVersionsFromReferencesAtPaths("Provenance.target", "Provenance.entity.what");

		RestfulServer server = new RestfulServer(fhirContext);
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		server.setETagSupport(ETagSupportEnum.ENABLED);
		server.setPagingProvider(pagingProvider);

		// CRUD, search, history, $meta etc. for every R4 resource type
		server.registerProviders(resourceProviderFactory.createProviders());
		// transaction / batch Bundles, system-level history
		server.registerProvider(systemProvider);
		// Subscription/$trigger-subscription, to re-send notifications on demand
		server.registerProvider(subscriptionTriggeringProvider);
		if (props.isBulkExportEnabled()) {
			// $export (system, Patient, Group) and $export-poll-status; the CapabilityStatement
			// below lists the operations of every registered provider.
			server.registerProvider(bulkDataExportProvider);
		}

		JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		capabilities.setImplementationDescription("FHIR billing adapter test server (HAPI FHIR R4, H2 in memory)");
		server.setServerConformanceProvider(capabilities);
		return server;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServletRegistration(
			RestfulServer fhirRestfulServer, TestServerProperties props) {
		String path = props.getFhirPath().replaceAll("/+$", "");
		ServletRegistrationBean<RestfulServer> registration =
				new ServletRegistrationBean<>(fhirRestfulServer, path + "/*");
		registration.setName("fhirServlet");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
