from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from adapter.errors import (
    AuthError,
    FatalFHIRError,
    InvalidJSON,
    TransientFHIRError,
    VersionConflict,
)
from adapter.retry import RETRYABLE_STATUSES, RetryPolicy, is_transient, parse_retry_after

NOW = datetime(2026, 7, 24, 12, 0, 0, tzinfo=UTC)


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(base_delay=1.0, factor=2.0, max_delay=5.0, jitter=0.0)

    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_jitter_spreads_the_delay_by_the_fraction() -> None:
    policy = RetryPolicy(base_delay=10.0, factor=1.0, max_delay=10.0, jitter=0.2)

    assert policy.delay(1, rand=lambda: 0.0) == pytest.approx(8.0)
    assert policy.delay(1, rand=lambda: 0.5) == pytest.approx(10.0)
    assert policy.delay(1, rand=lambda: 0.999999) == pytest.approx(12.0)
    assert all(8.0 <= policy.delay(1) <= 12.0 for _ in range(200))


def test_retry_after_wins_but_is_capped() -> None:
    policy = RetryPolicy(base_delay=1.0, retry_after_cap=60.0)

    assert policy.delay(1, retry_after=7.0) == 7.0
    assert policy.delay(3, retry_after=3600.0) == 60.0
    assert policy.delay(1, retry_after=-5.0) == 0.0


def test_retryable_statuses() -> None:
    policy = RetryPolicy()

    assert {429, 500, 502, 503, 504} == RETRYABLE_STATUSES
    assert all(policy.is_retryable_status(status) for status in (429, 500, 502, 503, 504))
    assert not any(policy.is_retryable_status(s) for s in (400, 401, 404, 409, 412, 501, 505))


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Fri, 24 Jul 2026 12:00:30 GMT", 30.0),
        ("Fri, 24 Jul 2026 11:59:00 GMT", 0.0),  # already past
        ("Friday, 24-Jul-26 12:01:00 GMT", 60.0),  # obsolete RFC 850 form
        ("soon", None),
        ("-3", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


def test_parse_retry_after_defaults_to_the_current_time() -> None:
    soon = datetime.now(UTC) + timedelta(seconds=100)
    parsed = parse_retry_after(soon.strftime("%a, %d %b %Y %H:%M:%S GMT"))

    assert parsed is not None and 90 <= parsed <= 100


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TransientFHIRError("503", status=503), True),
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (VersionConflict("409", status=409), False),
        (FatalFHIRError("404", status=404), False),
        (AuthError("401", status=401), False),
        (InvalidJSON("bad", source="request body"), False),
        (KeyError("bug"), False),
    ],
)
def test_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient
