package org.fhirbilling.hapiserver;

import ca.uhn.fhir.batch2.api.IJobMaintenanceService;
import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.IDaoRegistry;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.config.HibernatePropertiesProvider;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.config.util.ResourceCountCacheUtil;
import ca.uhn.fhir.jpa.dao.FulltextSearchSvcImpl;
import ca.uhn.fhir.jpa.dao.IFulltextSearchSvc;
import ca.uhn.fhir.jpa.dao.search.HSearchSortHelperImpl;
import ca.uhn.fhir.jpa.dao.search.IHSearchSortHelper;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.DaoRegistryResourceSupportedSvc;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.search.IStaleSearchDeletingSvc;
import ca.uhn.fhir.jpa.search.StaleSearchDeletingSvcImpl;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.util.ResourceCountCache;
import ca.uhn.fhir.rest.api.IResourceSupportedSvc;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import org.hibernate.dialect.Dialect;
import org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType;
import org.springframework.beans.factory.SmartInitializingSingleton;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.autoconfigure.orm.jpa.JpaProperties;
import org.springframework.boot.context.properties.EnableConfigurationProperties;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

import java.util.HashMap;
import java.util.Map;
import javax.sql.DataSource;

/**
 * The beans HAPI's JPA and subscription configs expect the host application to provide.
 */
@Configuration
@EnableConfigurationProperties(TestServerProperties.class)
@Import(ThreadPoolFactoryConfig.class)
public class HapiBeans {

	// ---------------------------------------------------------------- settings

	@Bean
	public JpaStorageSettings jpaStorageSettings(TestServerProperties props) {
		JpaStorageSettings settings = new JpaStorageSettings();
		// EHR data carries absolute references to the EHR's own server (corpus-notes.md,
		// quirk 1); a test server standing in for that EHR must store them as they are.
		settings.setAllowExternalReferences(true);
		// The adapter's Provenance names the Claim version it wrote and the versions it read
		// (version-specific references); HAPI strips versions from references unless told, and
		// versions a reference to a resource created in the same transaction (our drafts).
		settings.setAutoVersionReferenceAtPaths("Provenance.target", "Provenance.entity.what");
		// Tests search right after they write: never hand back a cached result list.
		settings.setReuseCachedSearchResultsForMillis(
				props.getReuseCachedSearchResultsMs() > 0 ? props.getReuseCachedSearchResultsMs() : null);
		if (props.isExpungeEnabled()) {
			settings.setExpungeEnabled(true);
			settings.setDeleteExpungeEnabled(true);
			settings.setAllowMultipleDelete(true);
		}
		if (props.isBulkExportEnabled()) {
			// FHIR Bulk Data export ($export on the system, Patient and Group): the adapter's
			// `replay --bulk-export` reads it. The NDJSON files are stored as Binary resources.
			settings.setEnableTaskBulkExportJobExecution(true);
			// Tests export, change the data and export again: an identical request must start a
			// new job, not hand back the files of the last one (HAPI reuses them by default).
			settings.setEnableBulkExportJobReuse(false);
			// Let a job move to its next step as soon as its chunks are done, not at the next
			// maintenance pass.
			settings.setJobFastTrackingEnabled(true);
		}
		return settings;
	}

	/**
	 * Batch2 jobs (bulk export among them) advance and finish in the job maintenance pass, which
	 * HAPI runs once a minute; an export of a few resources would then take a minute. Set before
	 * the scheduler starts (it schedules its jobs when the context has been refreshed).
	 */
	@Bean
	public SmartInitializingSingleton batch2MaintenanceInterval(
			IJobMaintenanceService maintenance, TestServerProperties props) {
		return () -> {
			if (maintenance instanceof JobMaintenanceServiceImpl impl) {
				impl.setScheduledJobFrequencyMillis(props.getBatch2MaintenanceIntervalMs());
			}
		};
	}

	@Bean
	public SubscriptionSettings subscriptionSettings(TestServerProperties props) {
		SubscriptionSettings settings = new SubscriptionSettings();
		if (props.isResthookEnabled()) {
			// Without this a Subscription with channel.type=rest-hook stays "requested" forever.
			settings.addSupportedSubscriptionType(SubscriptionChannelType.RESTHOOK);
		}
		settings.setSubscriptionChangeQueuedImmediately(props.isSubscriptionQueuedImmediately());
		settings.setSubscriptionIntervalInMs(props.getSubscriptionSubmitIntervalMs());
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	/** No e-mail channel; the delivery handler factory still wants an instance. */
	@Bean
	public IEmailSender emailSender() {
		return details -> {
			throw new UnsupportedOperationException("e-mail subscriptions are not supported by this test server");
		};
	}

	// ---------------------------------------------------------------- persistence

	@Bean
	@Primary
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			JpaProperties jpaProperties,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean emf =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		Map<String, Object> props = new HashMap<>(jpaProperties.getProperties());
		props.putIfAbsent("hibernate.dialect", HapiFhirH2Dialect.class.getName());
		props.putIfAbsent("hibernate.hbm2ddl.auto", "update");
		props.putIfAbsent("hibernate.search.enabled", "false");
		props.putIfAbsent("hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner");
		props.putIfAbsent(
				"hibernate.physical_naming_strategy",
				"org.hibernate.boot.model.naming.CamelCaseToUnderscoresNamingStrategy");
		props.putIfAbsent(
				"hibernate.implicit_naming_strategy",
				"org.springframework.boot.orm.jpa.hibernate.SpringImplicitNamingStrategy");
		props.putIfAbsent("hibernate.cache.use_query_cache", "false");
		props.putIfAbsent("hibernate.cache.use_second_level_cache", "false");
		emf.setPersistenceUnitName("HAPI_PU");
		emf.setJpaPropertyMap(props);
		emf.setDataSource(dataSource);
		return emf;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		JpaTransactionManager txManager = new JpaTransactionManager();
		txManager.setEntityManagerFactory(entityManagerFactory);
		return txManager;
	}

	/** Tells HAPI which SQL dialect it is talking to (H2 only, here). */
	@Bean
	@Primary
	public HibernatePropertiesProvider h2HibernatePropertiesProvider() {
		return new HibernatePropertiesProvider() {
			private final Dialect dialect = new HapiFhirH2Dialect();

			@Override
			public Dialect getDialect() {
				return dialect;
			}
		};
	}

	// ---------------------------------------------------------------- search support

	/** Hibernate Search is disabled; this implementation then simply reports "not available". */
	@Bean
	public IFulltextSearchSvc fullTextSearchSvc() {
		return new FulltextSearchSvcImpl();
	}

	@Bean
	public IHSearchSortHelper hSearchSortHelper(ISearchParamRegistry searchParamRegistry) {
		return new HSearchSortHelperImpl(searchParamRegistry);
	}

	@Bean
	public IStaleSearchDeletingSvc staleSearchDeletingSvc() {
		return new StaleSearchDeletingSvcImpl();
	}

	@Bean
	public DatabaseBackedPagingProvider databaseBackedPagingProvider() {
		DatabaseBackedPagingProvider paging = new DatabaseBackedPagingProvider();
		paging.setDefaultPageSize(20);
		paging.setMaximumPageSize(500);
		return paging;
	}

	@Bean
	public IResourceSupportedSvc resourceSupportedSvc(IDaoRegistry daoRegistry) {
		return new DaoRegistryResourceSupportedSvc(daoRegistry);
	}

	@Bean(name = "myResourceCountsCache")
	public ResourceCountCache resourceCountsCache(IFhirSystemDao<?, ?> systemDao) {
		return ResourceCountCacheUtil.newResourceCountCache(systemDao);
	}
}
