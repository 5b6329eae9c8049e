from __future__ import annotations

from pathlib import Path

import pytest

from adapter.errors import UsageError
from adapter.retry import RetryPolicy
from adapter.settings import DEFAULT_SMART_SCOPE, Settings

SMART_ENV = {
    "G0129_FHIR_AUTH": "smart",
    "G0129_SMART_CLIENT_ID": "g0129",
    "G0129_SMART_TOKEN_URL": "https://ehr.example/token",
    "G0129_SMART_PRIVATE_KEY": "/run/secrets/key.pem",
    "G0129_SMART_KID": "k1",
}


def test_defaults_from_an_empty_environment() -> None:
    settings = Settings.from_env({})

    assert settings == Settings()
    assert settings.fhir_base_url is None
    assert settings.data_dir == Path("./data")
    assert settings.fhir_auth == "none"
    assert settings.smart_alg == "RS384"
    assert settings.smart_scope == DEFAULT_SMART_SCOPE
    assert (settings.http_timeout, settings.retry_max_attempts, settings.retry_after_cap) == (
        10.0,
        4,
        60.0,
    )
    assert settings.max_body_bytes == 5 * 1024 * 1024
    assert settings.queue_retry_for >= 86400
    assert (settings.dead_letter_attempts, settings.catchup_interval) == (5, 60.0)
    assert settings.mappings_dir is None


def test_reads_every_variable() -> None:
    settings = Settings.from_env(
        {
            **SMART_ENV,
            "G0129_FHIR_BASE_URL": "http://hapi:8080/fhir/",
            "G0129_WEBHOOK_TOKEN": "hook-secret",
            "G0129_DATA_DIR": "/var/lib/g0129",
            "G0129_SMART_ALG": "ES384",
            "G0129_SMART_SCOPE": "system/Claim.read",
            "G0129_HTTP_TIMEOUT": "2.5",
            "G0129_RETRY_MAX_ATTEMPTS": "7",
            "G0129_RETRY_AFTER_CAP": "30",
            "G0129_MAX_BODY_BYTES": "1024",
            "G0129_QUEUE_RETRY_FOR": "600",
            "G0129_DEAD_LETTER_ATTEMPTS": "3",
            "G0129_CATCHUP_INTERVAL": "15",
            "G0129_MAPPINGS_DIR": "/etc/g0129/mappings",
            "G0129_REVIEW_OWNER": "Organization/billing-team",
            "G0129_UI_PASSWORD": "page-secret",
            "G0129_UI_USER_HEADER": "X-Forwarded-User",
        }
    )

    assert settings.fhir_base_url == "http://hapi:8080/fhir"  # trailing slash dropped
    assert settings.webhook_token == "hook-secret"
    assert settings.data_dir == Path("/var/lib/g0129")
    assert settings.fhir_auth == "smart"
    assert settings.smart_client_id == "g0129"
    assert settings.smart_token_url == "https://ehr.example/token"
    assert settings.smart_private_key == Path("/run/secrets/key.pem")
    assert settings.smart_kid == "k1"
    assert settings.smart_alg == "ES384"
    assert settings.smart_scope == "system/Claim.read"
    assert settings.http_timeout == 2.5
    assert settings.retry_max_attempts == 7
    assert settings.retry_after_cap == 30.0
    assert settings.max_body_bytes == 1024
    assert settings.queue_retry_for == 600.0
    assert settings.dead_letter_attempts == 3
    assert settings.catchup_interval == 15.0
    assert settings.mappings_dir == Path("/etc/g0129/mappings")
    assert settings.review_owner == "Organization/billing-team"
    assert (settings.ui_password, settings.ui_user_header) == ("page-secret", "X-Forwarded-User")
    assert "page-secret" not in repr(settings)


def test_logs_are_json_at_info_unless_told() -> None:
    assert (Settings().log_format, Settings().log_level) == ("json", "info")
    settings = Settings.from_env({"G0129_LOG_FORMAT": "text", "G0129_LOG_LEVEL": "debug"})
    assert (settings.log_format, settings.log_level) == ("text", "debug")


def test_empty_values_count_as_unset() -> None:
    assert Settings.from_env({"G0129_FHIR_TOKEN": "", "G0129_HTTP_TIMEOUT": " "}) == Settings()


def test_settings_are_frozen_and_keep_secrets_out_of_repr() -> None:
    settings = Settings.from_env(
        {"G0129_FHIR_AUTH": "bearer", "G0129_FHIR_TOKEN": "s3cret", "G0129_WEBHOOK_TOKEN": "h00k"}
    )
    with pytest.raises(AttributeError):
        settings.fhir_token = "other"  # type: ignore[misc]
    assert "s3cret" not in repr(settings)
    assert "h00k" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("G0129_FHIR_BASE_URL", "hapi:8080/fhir"),
        ("G0129_FHIR_AUTH", "basic"),
        ("G0129_SMART_ALG", "RS256"),
        ("G0129_HTTP_TIMEOUT", "ten"),
        ("G0129_HTTP_TIMEOUT", "0"),
        ("G0129_RETRY_AFTER_CAP", "nan"),
        ("G0129_RETRY_MAX_ATTEMPTS", "1.5"),
        ("G0129_DEAD_LETTER_ATTEMPTS", "0"),
        ("G0129_MAX_BODY_BYTES", "-1"),
        ("G0129_QUEUE_RETRY_FOR", "inf"),
        ("G0129_LOG_FORMAT", "xml"),
        ("G0129_LOG_LEVEL", "verbose"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(UsageError, match=name):
        Settings.from_env({name: value})


def test_bearer_needs_a_token() -> None:
    with pytest.raises(UsageError, match="G0129_FHIR_TOKEN"):
        Settings.from_env({"G0129_FHIR_AUTH": "bearer"})


@pytest.mark.parametrize("missing", sorted(set(SMART_ENV) - {"G0129_FHIR_AUTH"}))
def test_smart_needs_its_variables(missing: str) -> None:
    env = {name: value for name, value in SMART_ENV.items() if name != missing}
    with pytest.raises(UsageError, match=missing):
        Settings.from_env(env)


def test_http_retry_policy_follows_the_settings() -> None:
    settings = Settings.from_env({"G0129_RETRY_MAX_ATTEMPTS": "2", "G0129_RETRY_AFTER_CAP": "5"})
    policy = settings.http_retry_policy()

    assert isinstance(policy, RetryPolicy)
    assert (policy.max_attempts, policy.retry_after_cap) == (2, 5.0)


def test_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("G0129_CATCHUP_INTERVAL", "5")
    assert Settings.from_env().catchup_interval == 5.0


def test_the_database_url_is_sqlite_or_postgresql() -> None:
    assert Settings.from_env({}).database_url is None, "the SQLite file in G0129_DATA_DIR"
    for url in ("sqlite:////var/lib/g0129/queue.sqlite3", "postgresql://g0129:pw@db:5432/g0129"):
        assert Settings.from_env({"G0129_DATABASE_URL": url}).database_url == url
    with pytest.raises(UsageError, match="G0129_DATABASE_URL must be") as error:
        Settings.from_env({"G0129_DATABASE_URL": "mysql://u:secret@db/g0129"})
    assert "secret" not in str(error.value)
    assert "pw" not in repr(Settings.from_env({"G0129_DATABASE_URL": "postgresql://g0129:pw@db/g0129"}))


@pytest.mark.parametrize("value", ["billing-team", "Group/billing", "Organization/", "https://ehr.example/Organization/1", "Organization/a b"])
def test_the_review_owner_is_a_reference_r4_task_accepts(value: str) -> None:
    with pytest.raises(UsageError, match="G0129_REVIEW_OWNER must be a reference Type/id"):
        Settings.from_env({"G0129_REVIEW_OWNER": value})
