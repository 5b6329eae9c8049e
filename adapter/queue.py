"""The durable job queue: every accepted notification lives here until it is done or dead.

HAPI gives up on a notification after about a minute, so once the webhook has answered 2xx this
queue is the only copy of the work. It lives in an SQLite file or a PostgreSQL database
(adapter/store.py, `G0129_DATABASE_URL`), one SQL for both: each commit is durable before
`enqueue` returns, so neither a `kill -9` nor a power cut loses an accepted job. The service
groups the enqueues of concurrent requests into one transaction (group commit), so one fsync
serves many notifications.

A job is `pending` until it is `done` or `dead` (dead-lettered). A worker claims a pending job
by taking a lease on it; if the worker dies, the lease runs out and the job can be claimed
again, so "pending" covers both waiting and in-progress jobs: accepted, not finished. A lease
names its holder, and each holder shows itself alive with a lock the system drops when the
process dies, even by `kill -9` (adapter/store.py), so a service starting up, and every replica
as it works, reclaims the leases of dead holders at once (`reclaim_abandoned`) instead of
waiting out the lease.

Named locks (`try_lock`/`unlock`) keep two replicas from writing the same patient's Claims at
once, and let one catch-up timer serve every replica: a lock is a row with an expiry and a
holder; an expired lock, or one whose holder has died, is taken over. Every release (an unlock,
or a take-over, since the holder may have written before it died or overran) is numbered from
one counter, and the lock's row keeps the number of its last: a writer that reads what a lock
guards before taking it (it learns which lock only from what it read) notes the count before
reading (`lock_serial`), and once it holds the lock asks whether it was released since
(`released_since`): someone else may then have written after the read, and it reads again.

Deduplication: a job that knows its resource's `meta.lastUpdated` (the notification carried the
resource, or the catch-up search found it) is a duplicate of any job, in any state, for the
same (type, id, versionId, lastUpdated); after a FHIR server reset, data recreated as version 1
has another lastUpdated, so it is new work, not a repeat. A job that does not know it (id-only
content) is a duplicate only of the same job still waiting. There is at most one pending
catch-up job.

The schema is versioned (SQLite's `PRAGMA user_version`, PostgreSQL's `schema_version` table)
and migrated in place when the queue is opened: tables created, columns added with ALTER
TABLE, indexes replaced. A database written by a newer adapter is refused.

Besides jobs, the file keeps the small state the service needs to survive restarts:
catch-up checkpoints, the last event number seen per Subscription, and the Claim versions we
wrote ourselves (the loop guard).

Thread safety: one connection per `JobQueue`, and every call holds the store's lock, so
one instance may be shared by threads. Several processes may open the same database: SQLite
takes its write lock up front (`BEGIN IMMEDIATE`), PostgreSQL claims `FOR UPDATE SKIP LOCKED`,
so two workers never claim the same job.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Literal, get_args

import orjson

from adapter.errors import UsageError
from adapter.retry import RetryPolicy
from adapter.settings import Settings
from adapter.store import Db, Store, open_store

__all__ = ["CATCH_UP", "QUEUE_BACKOFF", "GroupCommit", "Job", "JobQueue", "JobState", "NewJob"]

log = logging.getLogger(__name__)

# The kind of the catch-up job (search for what changed since the checkpoint): at most one is pending.
CATCH_UP = "catch-up"
# The counter numbering lock releases.
_RELEASES = "lock-releases"

JobState = Literal["pending", "done", "dead"]

# Per-job backoff: long enough not to hammer a server that is down, short enough (at most 15
# minutes) that work resumes soon after it comes back. `max_attempts` is unused here: the
# queue bounds retries by time (transient) or by `dead_letter_attempts` (fatal).
QUEUE_BACKOFF = RetryPolicy(base_delay=5.0, factor=2.0, max_delay=900.0, retry_after_cap=3600.0)

_SCHEMA_VERSION = 4
# Tables as a new database gets them; an older one gets the missing columns from _ADDED_COLUMNS.
# The types that differ come from the store (str.format).
_TABLES = """
CREATE TABLE IF NOT EXISTS jobs (
    id           {id},
    kind         TEXT    NOT NULL,
    resource_type TEXT   NOT NULL,
    resource_id  TEXT    NOT NULL,
    version_id   TEXT    NOT NULL,
    payload      {blob},
    source       TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    tries        INTEGER NOT NULL DEFAULT 0,
    accepted_at  {real}    NOT NULL,
    window_start {real}    NOT NULL,
    not_before   {real}    NOT NULL,
    lease_until  {real},
    last_error   TEXT,
    updated_at   {real}    NOT NULL,
    last_updated TEXT    NOT NULL DEFAULT '',
    leased_by    TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) {rowid};
CREATE TABLE IF NOT EXISTS event_numbers (
    subscription TEXT PRIMARY KEY,
    number       INTEGER NOT NULL
) {rowid};
CREATE TABLE IF NOT EXISTS own_writes (
    claim_id     TEXT NOT NULL,
    version_id   TEXT NOT NULL,
    written_at   {real} NOT NULL,
    last_updated TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (claim_id, version_id)
) {rowid};
CREATE TABLE IF NOT EXISTS locks (
    name     TEXT PRIMARY KEY,
    holder   TEXT NOT NULL,
    token    TEXT NOT NULL,
    expires  {real} NOT NULL,
    released INTEGER NOT NULL DEFAULT 0
) {rowid};
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) {rowid};
"""
# Schema 2: the resource's meta.lastUpdated (part of the deduplication key) and the lease holder.
# Schema 3: the locks table (replicas).
# Schema 4: lock releases numbered (locks.released, the counters table); a released lock keeps
# its row (holder '', expires = when it was released) until done jobs are purged.
_ADDED_COLUMNS = (
    ("last_updated", "TEXT NOT NULL DEFAULT ''"),
    ("leased_by", "TEXT"),
)
_INDEXES = """
-- Schema 1 deduplicated on (type, id, versionId) for ever, which outlives a server reset.
DROP INDEX IF EXISTS jobs_version;
-- One job per resource version as the server dated it: redeliveries and catch-up finds of a
-- version we already have are dropped. Jobs without lastUpdated are deduplicated in enqueue().
CREATE UNIQUE INDEX IF NOT EXISTS jobs_key
    ON jobs (resource_type, resource_id, version_id, last_updated) WHERE last_updated <> '';
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, not_before);
CREATE INDEX IF NOT EXISTS jobs_kind ON jobs (kind, state);
"""

_COLUMNS = (
    "id, kind, resource_type, resource_id, version_id, payload, source, state, attempts, tries,"
    " accepted_at, window_start, not_before, lease_until, last_error, updated_at, last_updated,"
    " leased_by"
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
    last_updated: str = ""  # the resource's meta.lastUpdated, "" when unknown
    leased_by: str | None = None  # the queue instance (pid-uuid) holding the lease


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to enqueue. `last_updated` None means: read it from the payload's
    `meta.lastUpdated`, if there is a payload (so every caller's full-resource jobs get it)."""

    kind: str
    resource_type: str
    resource_id: str
    version_id: str = ""
    payload: bytes | None = None
    source: str = ""
    last_updated: str | None = None


class JobQueue:
    """The job queue in the store at `location`: an SQLite file (a path or `sqlite:///path`,
    created with its parent directories if missing) or a `postgresql://` database."""

    def __init__(
        self,
        location: str | Path,
        *,
        policy: RetryPolicy = QUEUE_BACKOFF,
        retry_for: float = 3 * 86400.0,
        dead_letter_attempts: int = 5,
        lease_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store: Store = open_store(location)
        # The SQLite file, None on PostgreSQL.
        self.path = self._store.path
        self._policy = policy
        self._retry_for = retry_for
        self._dead_letter_attempts = dead_letter_attempts
        self._lease_seconds = lease_seconds
        self._clock = clock
        # Who holds the leases and locks this instance takes; shown alive from the first one on.
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex}"
        try:
            self._migrate()
        except BaseException:
            self._store.close()
            raise

    def _migrate(self) -> None:
        store = self._store
        with store.transaction() as db:
            version = store.schema_version(db)
            if version > _SCHEMA_VERSION:
                raise UsageError(f"{store.name} was written by a newer adapter (schema {version})")
            _execute_script(db, _TABLES.format(**store.types))
            columns = store.columns(db, "jobs")
            for name, declaration in _ADDED_COLUMNS:
                if name not in columns:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
            if "last_updated" not in store.columns(db, "own_writes"):
                db.execute("ALTER TABLE own_writes ADD COLUMN last_updated TEXT NOT NULL DEFAULT ''")
            if "released" not in store.columns(db, "locks"):
                db.execute("ALTER TABLE locks ADD COLUMN released INTEGER NOT NULL DEFAULT 0")
            db.execute("INSERT INTO counters (name, value) VALUES (?, 0) ON CONFLICT (name) DO NOTHING", (_RELEASES,))
            _execute_script(db, _INDEXES)
            # Schema 1 let catch-up jobs pile up (one more per restart during an outage): keep
            # the oldest pending one.
            db.execute(
                "UPDATE jobs SET state = 'done', lease_until = NULL, leased_by = NULL,"
                " last_error = 'superseded: one catch-up at a time', updated_at = ?"
                " WHERE kind = ? AND state = 'pending' AND id > ("
                "SELECT min(id) FROM jobs WHERE kind = ? AND state = 'pending')",
                (self._clock(), CATCH_UP, CATCH_UP),
            )
            if version != _SCHEMA_VERSION:
                store.set_schema_version(db, _SCHEMA_VERSION)

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float] = time.time) -> JobQueue:
        return cls(
            settings.database_url or settings.data_dir / "queue.sqlite3",
            retry_for=settings.queue_retry_for,
            dead_letter_attempts=settings.dead_letter_attempts,
            clock=clock,
        )

    def close(self) -> None:
        self._store.close()

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
        last_updated: str | None = None,
    ) -> bool:
        """Record a job durably; True if it is new, False if it duplicates one we have.

        With a `last_updated` (given, or read from the payload's meta), a job duplicates any
        job, in any state, for the same (type, id, version, lastUpdated). Without one, nothing
        tells a redelivery from the same version made again after a server reset, so it
        duplicates only a job of the same kind for the same resource and version that is
        waiting and not yet claimed: that job will read the latest version anyway. One already
        claimed may have read an older version, so a new job is accepted. A catch-up job
        duplicates any pending catch-up job, claimed or not.
        """
        return self.enqueue_many(
            [NewJob(kind, resource_type, resource_id, version_id, payload, source, last_updated)]
        )[0]

    def enqueue_many(self, jobs: Iterable[NewJob]) -> builtins.list[bool]:
        """Record several jobs durably in one transaction (one fsync, whatever their number);
        for each, True if it is new. Deduplicated as `enqueue`, also among themselves."""
        now = self._clock()
        new = []
        with self._store.transaction() as db:
            serialized = False
            for job in jobs:
                last_updated = (
                    _last_updated_of(job.payload) if job.last_updated is None else job.last_updated
                )
                if not serialized and (job.kind == CATCH_UP or not last_updated):
                    # A look for a duplicate, then an insert: no other enqueue in between.
                    self._store.serialize(db)
                    serialized = True
                if job.kind == CATCH_UP:
                    duplicate = db.execute(
                        "SELECT 1 FROM jobs WHERE kind = ? AND state = 'pending' LIMIT 1", (CATCH_UP,)
                    ).fetchone()
                elif not last_updated:
                    duplicate = db.execute(
                        "SELECT 1 FROM jobs WHERE state = 'pending' AND last_updated = ''"
                        " AND kind = ? AND resource_type = ? AND resource_id = ? AND version_id = ?"
                        " AND (lease_until IS NULL OR lease_until <= ?) LIMIT 1",
                        (job.kind, job.resource_type, job.resource_id, job.version_id, now),
                    ).fetchone()
                else:
                    duplicate = None  # the unique index decides
                if duplicate is not None:
                    new.append(False)
                    continue
                cursor = db.execute(
                    "INSERT INTO jobs (kind, resource_type, resource_id, version_id, payload, source,"
                    " state, accepted_at, window_start, not_before, updated_at, last_updated)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (
                        job.kind,
                        job.resource_type,
                        job.resource_id,
                        job.version_id,
                        job.payload,
                        job.source,
                        now,
                        now,
                        now,
                        now,
                        last_updated,
                    ),
                )
                new.append(cursor.rowcount == 1)
        return new

    def claim_next(self, now: float) -> Job | None:
        """Lease the next pending job that is due, or return None if there is none.

        A job whose lease ran out was being worked on by a worker that died. That counts as a
        failed attempt, so a job that kills its worker every time ends up dead, not looping.
        """
        self._store.hold_owner(self.owner)
        with self._store.transaction() as db:
            while True:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE state = 'pending' AND not_before <= ?"
                    " AND (lease_until IS NULL OR lease_until <= ?)"
                    " ORDER BY not_before, id LIMIT 1" + self._store.claim_lock,
                    (now, now),
                ).fetchone()
                if row is None:
                    return None
                job = Job(*row)
                attempts = job.attempts + (job.lease_until is not None)
                if attempts >= self._dead_letter_attempts:
                    reason = f"its worker stopped {attempts} times mid-job"
                    self._set_state(db, job.id, "dead", reason, now)
                    log.error(
                        "job %s dead-lettered: %s", job.id, reason,
                        extra={"event": "dead-letter", "job": job.id, "resource": f"{job.resource_type}/{job.resource_id}",
                               "error": reason, "tries": attempts},
                    )
                    continue
                lease_until = now + self._lease_seconds
                db.execute(
                    "UPDATE jobs SET lease_until = ?, leased_by = ?, attempts = ?, updated_at = ?"
                    " WHERE id = ?",
                    (lease_until, self.owner, attempts, now, job.id),
                )
                return replace(
                    job, lease_until=lease_until, leased_by=self.owner, attempts=attempts, updated_at=now
                )

    def reclaim_abandoned(self) -> int:
        """End at once the leases whose holder has died (its lock file is gone or unlocked), so
        their jobs are claimable now rather than when the lease runs out; returns how many.

        Such a lease still counts as an attempt when its job is claimed again (see
        `claim_next`). A lease of a live holder (another process on the same file) is kept.
        Leases from schema 1, which named no holder, count as dead: the service that held
        them was stopped to upgrade.
        """
        now = self._clock()
        with self._store.transaction() as db:
            holders = [
                row[0]
                for row in db.execute(
                    "SELECT DISTINCT leased_by FROM jobs WHERE state = 'pending' AND lease_until > ?",
                    (now,),
                )
            ]
            reclaimed = 0
            for holder in holders:
                if holder == self.owner or self._store.holder_alive(db, holder):
                    continue
                reclaimed += db.execute(
                    "UPDATE jobs SET lease_until = ?, updated_at = ?"
                    " WHERE state = 'pending' AND lease_until > ? AND leased_by IS NOT DISTINCT FROM ?",
                    (now, now, now, holder),
                ).rowcount
            return reclaimed

    def try_lock(self, name: str, seconds: float) -> str | None:
        """Take the lock `name` for `seconds` unless someone else holds it; returns the token
        that releases it, or None. An expired lock, or one whose holder has died, is taken
        over. Holders are queue instances: tasks sharing one instance exclude each other too.
        """
        self._store.hold_owner(self.owner)
        token = uuid.uuid4().hex
        with self._store.transaction() as db:
            now = self._clock()
            row = db.execute("SELECT holder, token, expires FROM locks WHERE name = ?", (name,)).fetchone()
            if row is None:
                return token if db.execute(
                    "INSERT INTO locks (name, holder, token, expires) VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                    (name, self.owner, token, now + seconds),
                ).rowcount == 1 else None
            holder, current, expires = row
            if holder and expires > now and (holder == self.owner or self._store.holder_alive(db, holder)):
                return None
            # A holder that died or overran may have written: taking its lock is a release.
            released = self._next_release(db) if holder else None
            # On the token read: of two replicas taking it at once, one changes the row.
            taken = db.execute(
                "UPDATE locks SET holder = ?, token = ?, expires = ?, released = coalesce(?, released)"
                " WHERE name = ? AND token = ?",
                (self.owner, token, now + seconds, released, name, current),
            ).rowcount
        return token if taken == 1 else None

    def unlock(self, name: str, token: str) -> None:
        """Release a lock `try_lock` gave (nothing if it has been taken over since)."""
        with self._store.transaction() as db:
            if db.execute("SELECT 1 FROM locks WHERE name = ? AND token = ?", (name, token)).fetchone() is None:
                return
            db.execute(
                "UPDATE locks SET holder = '', token = '', expires = ?, released = ? WHERE name = ? AND token = ?",
                (self._clock(), self._next_release(db), name, token),
            )

    def lock_serial(self) -> int:
        """How many lock releases there have been so far: noted before reading what a lock
        guards, and given to `released_since` once the lock is held."""
        with self._store.read() as db:
            row = db.execute("SELECT value FROM counters WHERE name = ?", (_RELEASES,)).fetchone()
        return 0 if row is None else int(row[0])

    def released_since(self, names: Sequence[str], serial: int) -> bool:
        """Whether any of these locks was released after `lock_serial` gave `serial`: what was
        read before they were taken may be stale, as another writer held them since."""
        with self._store.read() as db:
            return any(
                db.execute("SELECT 1 FROM locks WHERE name = ? AND released > ?", (name, serial)).fetchone() is not None
                for name in names
            )

    def _next_release(self, db: Db) -> int:
        # The counter's row is locked until the transaction ends: releases are numbered in turn.
        db.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (_RELEASES,))
        return int(db.execute("SELECT value FROM counters WHERE name = ?", (_RELEASES,)).fetchone()[0])

    def complete(self, job_id: int) -> None:
        """Mark a job done."""
        with self._store.transaction() as db:
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
        with self._store.transaction() as db:
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
                    " lease_until = NULL, leased_by = NULL, last_error = ?, updated_at = ?"
                    " WHERE id = ?",
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
        with self._store.transaction() as db:
            self._set_state(db, job_id, "dead", reason, self._clock())

    def get(self, job_id: int) -> Job:
        with self._store.read() as db:
            return self._get(db, job_id)

    def list(self, state: JobState) -> builtins.list[Job]:
        """Jobs in `state`, oldest first."""
        _check_state(state)
        with self._store.read() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY id", (state,)
            ).fetchall()
        return [Job(*row) for row in rows]

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
        with self._store.transaction() as db:
            return db.execute(query, params).rowcount

    def purge(self, state: JobState, before: float | None = None) -> int:
        """Delete done or dead jobs (last touched before `before`, if given); returns how many.

        Pending jobs cannot be purged: they are work we promised to do. Purging done jobs also
        forgets the Claim versions we wrote before `before`: like done jobs, they only serve to
        recognise repeats (our own write's echo comes within seconds), and after a FHIR server
        reset a recreated Claim may reach a version number we once wrote. It also forgets the
        locks released before `before` (see `released_since`).
        """
        if state not in ("done", "dead"):
            raise UsageError(f"only done or dead jobs can be purged, not {state}")
        cutoff = float("inf") if before is None else before
        with self._store.transaction() as db:
            if state == "done":
                db.execute("DELETE FROM own_writes WHERE written_at < ?", (cutoff,))
                # A release that old is older than any read still in flight.
                db.execute("DELETE FROM locks WHERE holder = '' AND expires < ?", (cutoff,))
            return db.execute(
                "DELETE FROM jobs WHERE state = ? AND updated_at < ?", (state, cutoff)
            ).rowcount

    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state, every state present."""
        counts: dict[JobState, int] = {state: 0 for state in get_args(JobState)}
        with self._store.read() as db:
            for state, count in db.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
                counts[state] = count
        return counts

    # --- service state ----------------------------------------------------------------------

    def get_checkpoint(self, name: str) -> str | None:
        with self._store.read() as db:
            row = db.execute(
                "SELECT value FROM checkpoints WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else str(row[0])

    def set_checkpoint(self, name: str, value: str) -> None:
        with self._store.transaction() as db:
            db.execute(
                "INSERT INTO checkpoints (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    def last_event_number(self, subscription: str) -> int | None:
        with self._store.read() as db:
            row = db.execute(
                "SELECT number FROM event_numbers WHERE subscription = ?", (subscription,)
            ).fetchone()
        return None if row is None else int(row[0])

    def record_event_number(self, subscription: str, number: int) -> int | None:
        """Remember the highest event number seen for a Subscription; returns the previous one.

        Deliveries arrive out of order (HAPI runs 5 delivery threads), so a lower number never
        replaces a higher one. Comparing with the return value shows a gap in one step.
        """
        with self._store.transaction() as db:
            row = db.execute(
                "SELECT number FROM event_numbers WHERE subscription = ?", (subscription,)
            ).fetchone()
            db.execute(
                "INSERT INTO event_numbers (subscription, number) VALUES (?, ?)"
                f" ON CONFLICT (subscription) DO UPDATE SET number = {self._store.greatest}(event_numbers.number, excluded.number)",
                (subscription, number),
            )
        return None if row is None else int(row[0])

    def forget_event_number(self, subscription: str) -> None:
        """Start a Subscription's event numbers afresh (its handshake: it was created or
        re-activated, perhaps on a server that was reset, and counts from 1 again)."""
        with self._store.transaction() as db:
            db.execute("DELETE FROM event_numbers WHERE subscription = ?", (subscription,))

    def record_own_write(self, claim_id: str, version_id: str, last_updated: str | None = None) -> None:
        """Remember that we wrote this Claim version (at the server's `last_updated`, when it
        said), so its notification is not work."""
        with self._store.transaction() as db:
            db.execute(
                "INSERT INTO own_writes (claim_id, version_id, written_at, last_updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (claim_id, version_id) DO UPDATE SET written_at = excluded.written_at,"
                " last_updated = excluded.last_updated",
                (claim_id, version_id, self._clock(), _instant_key(last_updated)),
            )

    def is_own_write(self, claim_id: str, version_id: str, last_updated: str | None = None) -> bool:
        """Whether we wrote this Claim version. When both the write and the notification say
        when the version was made, they must agree: a server reset that makes the Claim anew
        reaches the same version numbers with other content, and that is work."""
        with self._store.read() as db:
            row = db.execute(
                "SELECT last_updated FROM own_writes WHERE claim_id = ? AND version_id = ?",
                (claim_id, version_id),
            ).fetchone()
        if row is None:
            return False
        ours, theirs = row[0], _instant_key(last_updated)
        return not ours or not theirs or ours == theirs

    # --- internals --------------------------------------------------------------------------

    @staticmethod
    def _get(db: Db, job_id: int) -> Job:
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UsageError(f"no job {job_id} in the queue")
        return Job(*row)

    @staticmethod
    def _set_state(
        db: Db, job_id: int, state: JobState, error: str | None, now: float
    ) -> None:
        cursor = db.execute(
            "UPDATE jobs SET state = ?, lease_until = NULL, leased_by = NULL, last_error = ?,"
            " updated_at = ? WHERE id = ?",
            (state, error, now, job_id),
        )
        if cursor.rowcount != 1:
            raise UsageError(f"no job {job_id} in the queue")


class GroupCommit:
    """The enqueues of concurrent requests, committed together: while one transaction is being
    made durable, the requests that arrive wait for the next, which takes them all. One
    commit (one fsync) then serves many notifications, and each request still has its answer
    only once its own jobs are durable. Deduplicated as `JobQueue.enqueue_many`, in arrival
    order; one event loop's requests only (each process has its own)."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self._waiting: builtins.list[tuple[builtins.list[NewJob], asyncio.Future[builtins.list[bool]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def enqueue(self, jobs: Sequence[NewJob]) -> builtins.list[bool]:
        """Store `jobs` durably; for each, True if it is new."""
        future: asyncio.Future[builtins.list[bool]] = asyncio.get_running_loop().create_future()
        self._waiting.append((builtins.list(jobs), future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                jobs = [job for request, _ in batch for job in request]
                try:
                    new = await asyncio.to_thread(self.queue.enqueue_many, jobs)
                except Exception as exc:  # each request of the batch fails with it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for request, future in batch:
                    if not future.done():  # a request whose client went away
                        future.set_result(new[start : start + len(request)])
                    start += len(request)
        finally:
            self._flusher = None


def _execute_script(db: Db, script: str) -> None:
    # Statement by statement: executescript() would commit the transaction we are in.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _last_updated_of(payload: bytes | None) -> str:
    """The `meta.lastUpdated` of a JSON resource payload, or "" (none, or not readable)."""
    if payload is None:
        return ""
    try:
        resource = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return ""
    meta = resource.get("meta") if isinstance(resource, dict) else None
    updated = meta.get("lastUpdated") if isinstance(meta, dict) else None
    return updated if isinstance(updated, str) else ""


def _check_state(state: str) -> None:
    if state not in get_args(JobState):
        raise UsageError(f"no such job state {state!r}; use one of {', '.join(get_args(JobState))}")


def _instant_key(value: str | None) -> str:
    """An instant in one spelling (UTC, milliseconds), so `...Z` and `...+00:00` compare equal;
    '' when absent or unreadable."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return ""
    if moment.tzinfo is None:
        return ""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
