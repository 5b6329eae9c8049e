package org.fhirbilling.hapiserver;

import org.springframework.boot.context.properties.ConfigurationProperties;

/**
 * Our own knobs, bound from {@code testserver.*} in application.yaml (or the matching
 * {@code TESTSERVER_*} environment variables / {@code --testserver.*} arguments).
 */
@ConfigurationProperties(prefix = "testserver")
public class TestServerProperties {

	/** Servlet path of the FHIR REST base, e.g. {@code /fhir}. */
	private String fhirPath = "/fhir";

	/** Enable R4 rest-hook subscription delivery. */
	private boolean resthookEnabled = true;

	/**
	 * Interval (ms) of HAPI's job that submits persisted resource-modified messages (including the
	 * one that activates a new Subscription) to the subscription pipeline.
	 */
	private long subscriptionSubmitIntervalMs = 500;

	/**
	 * Hand resource changes to the subscription pipeline straight away instead of via the job above.
	 * Off by default: the immediate path races the commit and relies on HAPI's retry.
	 */
	private boolean subscriptionQueuedImmediately = false;

	/** Keep search results cached for re-use this long (ms); 0 disables (tests want fresh results). */
	private long reuseCachedSearchResultsMs = 0;

	/** Allow $expunge and DELETE with several matches (handy for resetting state between tests). */
	private boolean expungeEnabled = true;

	/** FHIR Bulk Data export ({@code $export} on the system, Patient and Group, and its status URL). */
	private boolean bulkExportEnabled = true;

	/** Interval (ms) of HAPI's batch2 job maintenance pass, which moves a bulk export to its end. */
	private long batch2MaintenanceIntervalMs = 1000;

	public String getFhirPath() {
		return fhirPath;
	}

	public void setFhirPath(String fhirPath) {
		this.fhirPath = fhirPath;
	}

	public boolean isResthookEnabled() {
		return resthookEnabled;
	}

	public void setResthookEnabled(boolean resthookEnabled) {
		this.resthookEnabled = resthookEnabled;
	}

	public long getSubscriptionSubmitIntervalMs() {
		return subscriptionSubmitIntervalMs;
	}

	public void setSubscriptionSubmitIntervalMs(long subscriptionSubmitIntervalMs) {
		this.subscriptionSubmitIntervalMs = subscriptionSubmitIntervalMs;
	}

	public boolean isSubscriptionQueuedImmediately() {
		return subscriptionQueuedImmediately;
	}

	public void setSubscriptionQueuedImmediately(boolean subscriptionQueuedImmediately) {
		this.subscriptionQueuedImmediately = subscriptionQueuedImmediately;
	}

	public long getReuseCachedSearchResultsMs() {
		return reuseCachedSearchResultsMs;
	}

	public void setReuseCachedSearchResultsMs(long reuseCachedSearchResultsMs) {
		this.reuseCachedSearchResultsMs = reuseCachedSearchResultsMs;
	}

	public boolean isExpungeEnabled() {
		return expungeEnabled;
	}

	public void setExpungeEnabled(boolean expungeEnabled) {
		this.expungeEnabled = expungeEnabled;
	}

	public boolean isBulkExportEnabled() {
		return bulkExportEnabled;
	}

	public void setBulkExportEnabled(boolean bulkExportEnabled) {
		this.bulkExportEnabled = bulkExportEnabled;
	}

	public long getBatch2MaintenanceIntervalMs() {
		return batch2MaintenanceIntervalMs;
	}

	public void setBatch2MaintenanceIntervalMs(long batch2MaintenanceIntervalMs) {
		this.batch2MaintenanceIntervalMs = batch2MaintenanceIntervalMs;
	}
}
