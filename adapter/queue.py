"""The durable job queue: every accepted notification lives here until it is done or dead.

HAPI gives up on a notification after about a minute, so once the webhook has answered 2xx this
file is the only copy of the work. Hence SQLite in WAL mode with `synchronous=FULL`: each commit
is fsynced before `enqueue` returns, so neither a `kill -9` nor a power cut loses an accepted
job (NORMAL would survive the former but may roll back the last commits on the latter). The
cost, one fsync per enqueue, is small next to a webhook round trip.

A job is `pending` until it is `done` or `dead` (dead-lettered). A worker claims a pending job
by taking a lease on it; if the worker dies, the lease runs out and the job can be claimed
again, so "pending" covers both waiting and in-progress jobs: accepted, not finished.

Besides jobs, the file keeps the small state the service needs to survive restarts:
catch-up checkpoints, the last event number seen per Subscription, and the Claim versions we
wrote ourselves (the loop guard).

Thread safety: one connection per `JobQueue`, and every call holds the instance's lock, so
one instance may be shared by threads. Several processes may open the same file: writes take
SQLite's write lock up front (`BEGIN IMMEDIATE`), so two workers never claim the same job.
"""

from __future__ import annotations

import builtins
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Literal, get_args

from adapter.errors import UsageError
from adapter.retry import RetryPolicy
from adapter.settings import Settings

__all__ = ["QUEUE_BACKOFF", "Job", "JobQueue", "JobState"]

JobState = Literal["pending", "done", "dead"]

# Per-job backoff: long enough not to hammer a server that is down, short enough (at most 15
# minutes) that work resumes soon after it comes back. `max_attempts` is unused here: the
# queue bounds retries by time (transient) or by `dead_letter_attempts` (fatal).
QUEUE_BACKOFF = RetryPolicy(base_delay=5.0, factor=2.0, max_delay=900.0, retry_after_cap=3600.0)

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY,
    kind         TEXT    NOT NULL,
    resource_type TEXT   NOT NULL,
    resource_id  TEXT    NOT NULL,
    version_id   TEXT    NOT NULL,
    payload      BLOB,
    source       TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    tries        INTEGER NOT NULL DEFAULT 0,
    accepted_at  REAL    NOT NULL,
    window_start REAL    NOT NULL,
    not_before   REAL    NOT NULL,
    lease_until  REAL,
    last_error   TEXT,
    updated_at   REAL    NOT NULL
);
-- One job per resource version, ever: redeliveries and catch-up finds of a version we already
-- have are dropped. Id-only jobs (empty version) are deduplicated in enqueue() instead.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_version
    ON jobs (resource_type, resource_id, version_id) WHERE version_id <> '';
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, not_before);
CREATE TABLE IF NOT EXISTS checkpoints (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_numbers (
    subscription TEXT PRIMARY KEY,
    number       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS own_writes (
    claim_id   TEXT NOT NULL,
    version_id TEXT NOT NULL,
    written_at REAL NOT NULL,
    PRIMARY KEY (claim_id, version_id)
) WITHOUT ROWID;
"""

_COLUMNS = (
    "id, kind, resource_type, resource_id, version_id, payload, source, state, attempts, tries,"
    " accepted_at, window_start, not_before, lease_until, last_error, updated_at"
)


@dataclass(frozen=True, slots=True)
class Job:
    """One unit of work: look at this resource (version) and act on it.

    `attempts` counts fatal failures and lost leases (dead-lettered at the limit); `tries`
    counts every failure and sets the backoff. `window_start` is when the current run of
    transient retries began (enqueue, or a manual `retry`).
    """

    id: int
    kind: str
    resource_type: str
    resource_id: str
    version_id: str
    payload: bytes | None
    source: str
    state: JobState
    attempts: int
    tries: int
    accepted_at: float
    window_start: float
    not_before: float
    lease_until: float | None
    last_error: str | None
    updated_at: float


class JobQueue:
    """A SQLite-backed job queue at `path` (created with its parent directories if missing)."""

    def __init__(
        self,
        path: str | Path,
        *,
        policy: RetryPolicy = QUEUE_BACKOFF,
        retry_for: float = 3 * 86400.0,
        dead_letter_attempts: int = 5,
        lease_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._policy = policy
        self._retry_for = retry_for
        self._dead_letter_attempts = dead_letter_attempts
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # Autocommit mode: transactions are opened explicitly, see _transaction().
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._transaction() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > _SCHEMA_VERSION:
                raise UsageError(f"{self.path} was written by a newer adapter (schema {version})")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float] = time.time) -> JobQueue:
        return cls(
            settings.data_dir / "queue.sqlite3",
            retry_for=settings.queue_retry_for,
            dead_letter_attempts=settings.dead_letter_attempts,
            clock=clock,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- jobs -------------------------------------------------------------------------------

    def enqueue(
        self,
        kind: str,
        resource_type: str,
        resource_id: str,
        version_id: str,
        payload: bytes | None,
        source: str,
    ) -> bool:
        """Record a job durably; True if it is new, False if it duplicates one we have.

        With a `version_id`, a job duplicates any job, in any state, for the same version. With
        an empty one ("something about this resource changed"), it duplicates a job of the same
        kind for the same resource that is waiting and not yet claimed: that job will read the
        latest version anyway. One already claimed may have read an older version, so a new
        job is accepted.
        """
        now = self._clock()
        with self._transaction() as db:
            if (
                not version_id
                and db.execute(
                    "SELECT 1 FROM jobs WHERE state = 'pending' AND version_id = ''"
                    " AND kind = ? AND resource_type = ? AND resource_id = ?"
                    " AND (lease_until IS NULL OR lease_until <= ?) LIMIT 1",
                    (kind, resource_type, resource_id, now),
                ).fetchone()
            ):
                return False
            cursor = db.execute(
                "INSERT INTO jobs (kind, resource_type, resource_id, version_id, payload, source,"
                " state, accepted_at, window_start, not_before, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (kind, resource_type, resource_id, version_id, payload, source, now, now, now, now),
            )
            return cursor.rowcount == 1

    def claim_next(self, now: float) -> Job | None:
        """Lease the next pending job that is due, or return None if there is none.

        A job whose lease ran out was being worked on by a worker that died. That counts as a
        failed attempt, so a job that kills its worker every time ends up dead, not looping.
        """
        with self._transaction() as db:
            while True:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE state = 'pending' AND not_before <= ?"
                    " AND (lease_until IS NULL OR lease_until <= ?)"
                    " ORDER BY not_before, id LIMIT 1",
                    (now, now),
                ).fetchone()
                if row is None:
                    return None
                job = Job(**row)
                attempts = job.attempts + (job.lease_until is not None)
                if attempts >= self._dead_letter_attempts:
                    self._set_state(
                        db, job.id, "dead", f"its worker stopped {attempts} times mid-job", now
                    )
                    continue
                lease_until = now + self._lease_seconds
                db.execute(
                    "UPDATE jobs SET lease_until = ?, attempts = ?, updated_at = ? WHERE id = ?",
                    (lease_until, attempts, now, job.id),
                )
                return replace(job, lease_until=lease_until, attempts=attempts, updated_at=now)

    def complete(self, job_id: int) -> None:
        """Mark a job done."""
        with self._transaction() as db:
            self._set_state(db, job_id, "done", None, self._clock())

    def retry_later(
        self,
        job_id: int,
        error: str,
        transient: bool,
        now: float,
        retry_after: float | None = None,
    ) -> JobState:
        """Put a failed job back with backoff, or dead-letter it; returns its new state.

        A transient failure (the server is down or busy) is retried for as long as
        `retry_for` allows, however many tries that takes. Any other failure counts as an
        attempt, and the job is dead-lettered at `dead_letter_attempts`. `retry_after` (the
        server's own hint) replaces our backoff, within the policy's cap.
        """
        with self._transaction() as db:
            job = self._get(db, job_id)
            attempts = job.attempts + (not transient)
            if transient and now - job.window_start >= self._retry_for:
                reason = f"still failing after {now - job.window_start:.0f} s: {error}"
            elif attempts >= self._dead_letter_attempts:
                reason = f"failed {attempts} times: {error}"
            else:
                tries = job.tries + 1
                db.execute(
                    "UPDATE jobs SET state = 'pending', attempts = ?, tries = ?, not_before = ?,"
                    " lease_until = NULL, last_error = ?, updated_at = ? WHERE id = ?",
                    (
                        attempts,
                        tries,
                        now + self._policy.delay(tries, retry_after),
                        error,
                        now,
                        job_id,
                    ),
                )
                return "pending"
            db.execute("UPDATE jobs SET attempts = ? WHERE id = ?", (attempts, job_id))
            self._set_state(db, job_id, "dead", reason, now)
            return "dead"

    def dead_letter(self, job_id: int, reason: str) -> None:
        """Give up on a job now, keeping `reason` for whoever looks at the dead letters."""
        with self._transaction() as db:
            self._set_state(db, job_id, "dead", reason, self._clock())

    def get(self, job_id: int) -> Job:
        with self._lock:
            return self._get(self._db, job_id)

    def list(self, state: JobState) -> builtins.list[Job]:
        """Jobs in `state`, oldest first."""
        _check_state(state)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY id", (state,)
            ).fetchall()
        return [Job(**row) for row in rows]

    def retry(self, job_id: int | None = None) -> int:
        """Send one dead job (or, with no id, every dead job) back to pending, with a fresh
        attempt count and retry window. Returns how many jobs moved."""
        now = self._clock()
        query = (
            "UPDATE jobs SET state = 'pending', attempts = 0, tries = 0, window_start = ?,"
            " not_before = ?, lease_until = NULL, updated_at = ? WHERE state = 'dead'"
        )
        params: tuple[float | int, ...] = (now, now, now)
        if job_id is not None:
            query += " AND id = ?"
            params += (job_id,)
        with self._transaction() as db:
            return db.execute(query, params).rowcount

    def purge(self, state: JobState, before: float | None = None) -> int:
        """Delete done or dead jobs (last touched before `before`, if given); returns how many.

        Pending jobs cannot be purged: they are work we promised to do.
        """
        if state not in ("done", "dead"):
            raise UsageError(f"only done or dead jobs can be purged, not {state}")
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM jobs WHERE state = ? AND updated_at < ?",
                (state, float("inf") if before is None else before),
            ).rowcount

    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state, every state present."""
        counts: dict[JobState, int] = {state: 0 for state in get_args(JobState)}
        with self._lock:
            for state, count in self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
                counts[state] = count
        return counts

    # --- service state ----------------------------------------------------------------------

    def get_checkpoint(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM checkpoints WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else str(row[0])

    def set_checkpoint(self, name: str, value: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO checkpoints (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    def last_event_number(self, subscription: str) -> int | None:
        with self._lock:
            row = self._db.execute(
                "SELECT number FROM event_numbers WHERE subscription = ?", (subscription,)
            ).fetchone()
        return None if row is None else int(row[0])

    def record_event_number(self, subscription: str, number: int) -> int | None:
        """Remember the highest event number seen for a Subscription; returns the previous one.

        Deliveries arrive out of order (HAPI runs 5 delivery threads), so a lower number never
        replaces a higher one. Comparing with the return value shows a gap in one step.
        """
        with self._transaction() as db:
            row = db.execute(
                "SELECT number FROM event_numbers WHERE subscription = ?", (subscription,)
            ).fetchone()
            db.execute(
                "INSERT INTO event_numbers (subscription, number) VALUES (?, ?)"
                " ON CONFLICT (subscription) DO UPDATE SET number = max(number, excluded.number)",
                (subscription, number),
            )
        return None if row is None else int(row[0])

    def record_own_write(self, claim_id: str, version_id: str) -> None:
        """Remember that we wrote this Claim version, so its notification is not work."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO own_writes (claim_id, version_id, written_at) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (claim_id, version_id, self._clock()),
            )

    def is_own_write(self, claim_id: str, version_id: str) -> bool:
        with self._lock:
            return (
                self._db.execute(
                    "SELECT 1 FROM own_writes WHERE claim_id = ? AND version_id = ?",
                    (claim_id, version_id),
                ).fetchone()
                is not None
            )

    # --- internals --------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock at BEGIN, so a read-then-write (claim, dedup) cannot
        # interleave with another process's.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @staticmethod
    def _get(db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UsageError(f"no job {job_id} in the queue")
        return Job(**row)

    @staticmethod
    def _set_state(
        db: sqlite3.Connection, job_id: int, state: JobState, error: str | None, now: float
    ) -> None:
        cursor = db.execute(
            "UPDATE jobs SET state = ?, lease_until = NULL, last_error = ?, updated_at = ?"
            " WHERE id = ?",
            (state, error, now, job_id),
        )
        if cursor.rowcount != 1:
            raise UsageError(f"no job {job_id} in the queue")


def _check_state(state: str) -> None:
    if state not in get_args(JobState):
        raise UsageError(f"no such job state {state!r}; use one of {', '.join(get_args(JobState))}")
