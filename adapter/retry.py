"""The retry policy, as data, shared by per-call HTTP retries and per-job queue backoff.

Nothing here sleeps or does I/O: callers ask `RetryPolicy.delay()` how long to wait and do the
waiting themselves, so tests never sleep.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from adapter.errors import AdapterError, TransientFHIRError

__all__ = ["RETRYABLE_STATUSES", "RetryPolicy", "is_transient", "parse_retry_after"]

# The statuses cumulus-fhir-support retries: rate limiting and the 5xx that mean "not now".
# 501 and 505 are absent on purpose: the server will never support that request.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, and how far to trust a server's `Retry-After`.

    The delay before retry `n` (1 = the first retry) is `base_delay * factor ** (n - 1)`,
    capped at `max_delay`, then spread by up to `±jitter` of itself so that many clients that
    failed together do not retry together. `max_attempts` counts the first try.
    """

    max_attempts: int = 4
    base_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.2
    retry_after_cap: float = 60.0
    retryable_statuses: frozenset[int] = RETRYABLE_STATUSES

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        *,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry number `attempt` (1-based).

        A server's `retry_after` wins over our own backoff, since it knows when it will be ready,
        but it is capped at `retry_after_cap` so one bad header cannot stall us for hours.
        `rand` returns a float in [0, 1); pass a constant to make the jitter deterministic.
        """
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        backoff = min(self.base_delay * self.factor ** max(attempt - 1, 0), self.max_delay)
        spread = backoff * self.jitter * (2.0 * rand() - 1.0)
        return max(backoff + spread, 0.0)

    def is_retryable_status(self, status: int) -> bool:
        return status in self.retryable_statuses


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP-date.

    Returns None when the header is absent or unreadable (we then fall back to our own backoff),
    and 0 for a date in the past.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; an obsolete zone-less form means the same.
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max((when - now).total_seconds(), 0.0)


def is_transient(error: BaseException) -> bool:
    """Whether retrying the same work later may succeed.

    `FHIRClient` already turns network errors and timeouts into `TransientFHIRError`; the
    built-in `TimeoutError`/`ConnectionError` are covered too for I/O that does not go through
    it. Anything else, our own fatal errors and programming errors included, is fatal: retrying
    would only fail the same way.
    """
    if isinstance(error, TransientFHIRError):
        return True
    if isinstance(error, AdapterError):
        return False
    return isinstance(error, (TimeoutError, ConnectionError))
