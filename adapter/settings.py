"""Settings, read once from the environment and never changed afterwards.

This is the only module that reads `os.environ`: everything else receives a `Settings`.
Empty variables count as unset, so `G0129_FHIR_TOKEN=` in a compose file means "no token".
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, get_args

from adapter.errors import UsageError
from adapter.retry import RetryPolicy

__all__ = ["DEFAULT_SMART_SCOPE", "Settings"]

AuthMode = Literal["none", "bearer", "smart"]
SmartAlg = Literal["RS384", "ES384"]
LogFormat = Literal["json", "text"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
_T = TypeVar("_T", bound=str)

# SMART v2 scopes (permissions in c-r-u-d-s order): read and search what the rules look at,
# update the Claim we annotate and create the Provenance that goes with each write. Servers
# that only know v1 need G0129_SMART_SCOPE set to `system/Claim.read system/Claim.write ...`.
DEFAULT_SMART_SCOPE = " ".join(
    [
        # c: a draft Claim is created when an encounter has none yet.
        "system/Claim.crus",
        "system/Provenance.c",
        # The review Task beside a Claim under review: a conditional update on its identifier
        # (create, read and search it; update it on a re-decision).
        "system/Task.crus",
        *(
            f"system/{resource_type}.rs"
            for resource_type in (
                "Encounter",
                "Procedure",
                "Coverage",
                "Patient",
                "Practitioner",
                "PractitionerRole",
                "Organization",
                "Condition",
                "EpisodeOfCare",
                "CarePlan",
                "DocumentReference",
                # the documentation evidence of mappings/documentation.yaml
                "Goal",
                "Communication",
                "Observation",
            )
        ),
    ]
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the adapter can be told through `G0129_*` environment variables."""

    fhir_base_url: str | None = None
    # Secrets stay out of repr so logging a Settings never leaks them.
    webhook_token: str | None = field(default=None, repr=False)
    data_dir: Path = Path("./data")
    # Where the job queue lives: `sqlite:///PATH` or `postgresql://...` (adapter/store.py);
    # None: the SQLite file `queue.sqlite3` in data_dir.
    database_url: str | None = field(default=None, repr=False)
    fhir_auth: AuthMode = "none"
    fhir_token: str | None = field(default=None, repr=False)
    smart_client_id: str | None = None
    smart_token_url: str | None = None
    smart_private_key: Path | None = None
    smart_kid: str | None = None
    smart_alg: SmartAlg = "RS384"
    smart_scope: str = DEFAULT_SMART_SCOPE
    http_timeout: float = 10.0
    retry_max_attempts: int = 4
    retry_after_cap: float = 60.0
    max_body_bytes: int = 5 * 1024 * 1024
    # More events than this in one notification Bundle become one catch-up job, not one job each.
    max_events: int = 1000
    # HAPI drops a notification after about a minute of failed deliveries, so once we have
    # accepted a job we are its only copy: keep retrying through a long weekend's outage.
    queue_retry_for: float = 3 * 86400.0
    dead_letter_attempts: int = 5
    catchup_interval: float = 60.0
    # `replay --bulk-export` gives up on an export not complete after this long (seconds).
    bulk_export_max_wait: float = 12 * 3600.0
    # Jobs in flight at once in one process (each for other patients: adapter/worker.py).
    worker_concurrency: int = 4
    mappings_dir: Path | None = None
    # `g0129 serve`'s logs (adapter/logs.py): one JSON object per line unless `text`.
    log_format: LogFormat = "json"
    log_level: LogLevel = "info"
    # `Type/id` of the billing team the review Tasks are assigned to (Task.owner); None: unassigned.
    review_owner: str | None = None
    # The review page (GET /review) is off unless one of these is set: its own secret, or the
    # header a trusted proxy in front of us sets to the signed-in person's name.
    ui_password: str | None = field(default=None, repr=False)
    ui_user_header: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read `G0129_*` variables from `environ` (default: the process environment).

        Raises `UsageError` naming the variable when a value is malformed, or when the chosen
        `G0129_FHIR_AUTH` mode lacks a variable it needs.
        """
        env = _Env(os.environ if environ is None else environ)
        defaults = cls()
        return cls(
            fhir_base_url=_base_url(env.text("G0129_FHIR_BASE_URL")),
            webhook_token=env.text("G0129_WEBHOOK_TOKEN"),
            data_dir=env.path("G0129_DATA_DIR") or defaults.data_dir,
            database_url=_database_url(env.text("G0129_DATABASE_URL")),
            fhir_auth=env.choice("G0129_FHIR_AUTH", get_args(AuthMode), defaults.fhir_auth),
            fhir_token=env.text("G0129_FHIR_TOKEN"),
            smart_client_id=env.text("G0129_SMART_CLIENT_ID"),
            smart_token_url=env.text("G0129_SMART_TOKEN_URL"),
            smart_private_key=env.path("G0129_SMART_PRIVATE_KEY"),
            smart_kid=env.text("G0129_SMART_KID"),
            smart_alg=env.choice("G0129_SMART_ALG", get_args(SmartAlg), defaults.smart_alg),
            smart_scope=env.text("G0129_SMART_SCOPE") or defaults.smart_scope,
            http_timeout=env.seconds("G0129_HTTP_TIMEOUT", defaults.http_timeout),
            retry_max_attempts=env.positive_int(
                "G0129_RETRY_MAX_ATTEMPTS", defaults.retry_max_attempts
            ),
            retry_after_cap=env.seconds("G0129_RETRY_AFTER_CAP", defaults.retry_after_cap),
            max_body_bytes=env.positive_int("G0129_MAX_BODY_BYTES", defaults.max_body_bytes),
            max_events=env.positive_int("G0129_MAX_EVENTS", defaults.max_events),
            queue_retry_for=env.seconds("G0129_QUEUE_RETRY_FOR", defaults.queue_retry_for),
            dead_letter_attempts=env.positive_int(
                "G0129_DEAD_LETTER_ATTEMPTS", defaults.dead_letter_attempts
            ),
            catchup_interval=env.seconds("G0129_CATCHUP_INTERVAL", defaults.catchup_interval),
            bulk_export_max_wait=env.seconds("G0129_BULK_EXPORT_MAX_WAIT", defaults.bulk_export_max_wait),
            worker_concurrency=env.positive_int("G0129_WORKER_CONCURRENCY", defaults.worker_concurrency),
            mappings_dir=env.path("G0129_MAPPINGS_DIR"),
            log_format=env.choice("G0129_LOG_FORMAT", get_args(LogFormat), defaults.log_format),
            log_level=env.choice("G0129_LOG_LEVEL", get_args(LogLevel), defaults.log_level),
            review_owner=_review_owner(env.text("G0129_REVIEW_OWNER")),
            ui_password=env.text("G0129_UI_PASSWORD"),
            ui_user_header=env.text("G0129_UI_USER_HEADER"),
        )

    def http_retry_policy(self) -> RetryPolicy:
        """The per-call retry policy for FHIR requests."""
        return RetryPolicy(
            max_attempts=self.retry_max_attempts, retry_after_cap=self.retry_after_cap
        )

    def __post_init__(self) -> None:
        # Checked here rather than in from_env so no Settings can exist half-configured.
        required: tuple[str, ...] = ()
        if self.fhir_auth == "bearer":
            required = ("G0129_FHIR_TOKEN",)
        elif self.fhir_auth == "smart":
            required = (
                "G0129_SMART_CLIENT_ID",
                "G0129_SMART_TOKEN_URL",
                "G0129_SMART_PRIVATE_KEY",
                "G0129_SMART_KID",
            )
        missing = [name for name in required if getattr(self, _field(name)) is None]
        if missing:
            raise UsageError(
                f"G0129_FHIR_AUTH={self.fhir_auth} needs {', '.join(missing)} to be set"
            )


def _field(variable: str) -> str:
    return variable.removeprefix("G0129_").lower()


def _database_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise UsageError(f"G0129_DATABASE_URL must be sqlite:///PATH or postgresql://..., got {value.split('://')[0]}://...")
    return value


def _base_url(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.startswith(("http://", "https://")):
        raise UsageError(f"G0129_FHIR_BASE_URL must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


# What R4 allows as Task.owner that can stand for a billing team (R4 has no Group there).
_OWNER_TYPES = ("Organization", "PractitionerRole", "Practitioner", "CareTeam", "HealthcareService")
_OWNER = re.compile(rf"^(?:{'|'.join(_OWNER_TYPES)})/[A-Za-z0-9\-.]{{1,64}}$")


def _review_owner(value: str | None) -> str | None:
    if value is not None and not _OWNER.match(value):
        raise UsageError(
            f"G0129_REVIEW_OWNER must be a reference Type/id with Type one of {', '.join(_OWNER_TYPES)} "
            f"(the owner of R4's Task), got {value!r}"
        )
    return value


class _Env:
    """Typed access to one environment mapping; every error names the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def path(self, name: str) -> Path | None:
        value = self.text(name)
        return None if value is None else Path(value).expanduser()

    def choice(self, name: str, allowed: tuple[_T, ...], default: _T) -> _T:
        value = self.text(name)
        if value is None:
            return default
        if value not in allowed:
            raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        # The member of `allowed`, not `value`, so the result keeps its Literal type.
        return allowed[allowed.index(value)]

    def seconds(self, name: str, default: float) -> float:
        value = self.text(name)
        if value is None:
            return default
        try:
            seconds = float(value)
        except ValueError:
            raise UsageError(f"{name} must be a number of seconds, got {value!r}") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise UsageError(f"{name} must be a positive number of seconds, got {value!r}")
        return seconds

    def positive_int(self, name: str, default: int) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise UsageError(f"{name} must be a whole number, got {value!r}") from None
        if number <= 0:
            raise UsageError(f"{name} must be at least 1, got {value!r}")
        return number
