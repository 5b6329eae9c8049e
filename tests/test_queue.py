from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from adapter.errors import UsageError
from adapter.queue import CATCH_UP, GroupCommit, Job, JobQueue, NewJob
from adapter.retry import RetryPolicy
from adapter.settings import Settings

REPO = Path(__file__).resolve().parents[1]
T0 = 1_000_000.0
# No jitter, so backoff times can be asserted exactly.
POLICY = RetryPolicy(
    base_delay=10.0, factor=2.0, max_delay=100.0, jitter=0.0, retry_after_cap=300.0
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


# Every test taking `queue` or `database_url` runs on SQLite and on PostgreSQL (tests/conftest.py).
@pytest.fixture
def queue(database_url: str, clock: Clock) -> Iterator[JobQueue]:
    with JobQueue(
        database_url,
        policy=POLICY,
        retry_for=3600.0,
        dead_letter_attempts=3,
        lease_seconds=60.0,
        clock=clock,
    ) as queue:
        yield queue


def add(
    queue: JobQueue,
    resource_id: str = "c1",
    version_id: str = "1",
    kind: str = "claim",
    updated: str | None = None,
) -> bool:
    return queue.enqueue(
        kind, "Claim", resource_id, version_id, b'{"resourceType":"Claim"}', "webhook", updated
    )


# Two lastUpdated of one version: as first made, and as made again after a server reset.
BEFORE_RESET = "2026-07-24T12:00:00.000+00:00"
AFTER_RESET = "2026-07-25T08:30:00.000+00:00"


def claim(queue: JobQueue, now: float) -> Job:
    job = queue.claim_next(now)
    assert job is not None
    return job


# --- enqueue and dedup ---------------------------------------------------------------------



def _python(script: str) -> subprocess.Popen[str]:
    """Another Python process running `script` against this repository's code."""
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )

@contextmanager
def _killed_afterwards(script: str) -> Iterator[str]:
    """Run `script` in another Python process and give its first line; then SIGKILL it."""
    child = _python(textwrap.dedent(script))
    try:
        assert child.stdout is not None
        yield child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL


def test_enqueue_then_claim_returns_the_job(queue: JobQueue) -> None:
    assert add(queue) is True

    job = claim(queue, T0)

    assert (job.kind, job.resource_type, job.resource_id, job.version_id) == (
        "claim",
        "Claim",
        "c1",
        "1",
    )
    assert job.payload == b'{"resourceType":"Claim"}'
    assert job.source == "webhook"
    assert job.state == "pending"
    assert job.lease_until == T0 + 60.0
    assert queue.claim_next(T0) is None  # leased


def test_same_version_and_last_updated_is_deduplicated_in_every_state(queue: JobQueue) -> None:
    assert add(queue, updated=BEFORE_RESET) is True
    assert add(queue, updated=BEFORE_RESET) is False
    queue.complete(claim(queue, T0).id)
    # a redelivery after the work is done is still a duplicate
    assert add(queue, updated=BEFORE_RESET) is False
    assert add(queue, version_id="2", updated=BEFORE_RESET) is True
    assert add(queue, resource_id="c2", updated=BEFORE_RESET) is True
    assert queue.counts() == {"pending": 2, "done": 1, "dead": 0}


def test_a_version_made_again_after_a_server_reset_is_new_work(queue: JobQueue) -> None:
    assert add(queue, updated=BEFORE_RESET) is True
    queue.complete(claim(queue, T0).id)

    # The server was reset and the Claim recreated: version 1 again, another lastUpdated.
    assert add(queue, updated=AFTER_RESET) is True
    assert add(queue, updated=AFTER_RESET) is False

    (job,) = queue.list("pending")
    assert (job.version_id, job.last_updated) == ("1", AFTER_RESET)


def test_last_updated_is_read_from_the_payload_unless_given(queue: JobQueue) -> None:
    """The catch-up search enqueues found resources without naming lastUpdated: the key still
    has it, so catch-up finds of recreated data are new work too."""
    def found(updated: str) -> bytes:
        return orjson.dumps({"resourceType": "Claim", "id": "c1", "meta": {"versionId": "1", "lastUpdated": updated}})

    assert queue.enqueue("resource", "Claim", "c1", "1", found(BEFORE_RESET), "catch-up")
    queue.complete(claim(queue, T0).id)
    assert not queue.enqueue("resource", "Claim", "c1", "1", found(BEFORE_RESET), "catch-up")
    assert queue.enqueue("resource", "Claim", "c1", "1", found(AFTER_RESET), "catch-up")
    assert [job.last_updated for job in queue.list("pending")] == [AFTER_RESET]
    # An explicit value wins over the payload's; a payload that is not JSON has none.
    assert queue.enqueue("resource", "Claim", "c2", "1", found(BEFORE_RESET), "x", AFTER_RESET)
    assert queue.enqueue("resource", "Claim", "c3", "1", b"not json", "x")
    assert {job.resource_id: job.last_updated for job in queue.list("pending")} == {
        "c1": AFTER_RESET, "c2": AFTER_RESET, "c3": ""
    }


def test_a_version_without_last_updated_is_a_duplicate_only_while_waiting(queue: JobQueue) -> None:
    """Id-only content names a version but not when it was made: a done job for that version
    may be from before a server reset, so only a job still waiting makes it a duplicate."""
    assert add(queue) is True
    assert add(queue) is False
    queue.complete(claim(queue, T0).id)
    assert add(queue) is True
    assert add(queue) is False
    assert add(queue, version_id="2") is True


def test_id_only_jobs_dedupe_while_waiting_but_not_once_claimed(queue: JobQueue) -> None:
    assert add(queue, version_id="") is True
    assert add(queue, version_id="") is False
    assert add(queue, version_id="", kind="delete") is True  # another kind of work

    claim(queue, T0)

    # The claimed job may already have read an older version; this change needs its own job.
    assert add(queue, version_id="") is True
    assert add(queue, version_id="") is False


def test_one_pending_catch_up_at_a_time(queue: JobQueue) -> None:
    def catch_up() -> bool:
        return queue.enqueue(CATCH_UP, "Subscription", CATCH_UP, "", None, "timer")

    assert catch_up() is True
    assert catch_up() is False
    job = claim(queue, T0)
    assert catch_up() is False, "one claimed and running is still pending"
    queue.retry_later(job.id, "server down", transient=True, now=T0)
    assert catch_up() is False, "nor is one waiting out a backoff"
    queue.complete(claim(queue, T0 + 3600).id)
    assert catch_up() is True
    assert len(queue.list("pending")) == 1


def test_enqueue_many_is_deduplicated_among_itself(queue: JobQueue) -> None:
    jobs = [
        NewJob("resource", "Encounter", "e1", "1", None, "bundle", BEFORE_RESET),
        NewJob("resource", "Encounter", "e1", "1", None, "bundle", BEFORE_RESET),
        NewJob("resource", "Encounter", "e2"),
        NewJob("resource", "Encounter", "e2"),
        NewJob(CATCH_UP, "Subscription", CATCH_UP),
        NewJob(CATCH_UP, "Subscription", CATCH_UP),
    ]

    assert queue.enqueue_many(jobs) == [True, False, True, False, True, False]
    assert queue.enqueue_many([]) == []
    assert queue.counts()["pending"] == 3


def test_claims_come_in_order_and_respect_not_before(queue: JobQueue, clock: Clock) -> None:
    add(queue, "a")
    clock.now += 1
    add(queue, "b")

    first = claim(queue, T0 + 1)
    queue.retry_later(first.id, "busy", transient=True, now=T0 + 1)

    assert claim(queue, T0 + 1).resource_id == "b"
    assert queue.claim_next(T0 + 10) is None
    assert claim(queue, T0 + 11).resource_id == "a"


# --- leases --------------------------------------------------------------------------------


def test_an_expired_lease_makes_the_job_claimable_again(queue: JobQueue) -> None:
    add(queue)
    job = claim(queue, T0)

    assert queue.claim_next(T0 + 59) is None
    again = claim(queue, T0 + 60)

    assert again.id == job.id
    assert again.attempts == 1  # the lost worker counts as an attempt
    assert again.lease_until == T0 + 120


def test_a_job_that_keeps_killing_its_worker_is_dead_lettered(queue: JobQueue) -> None:
    add(queue)
    now = T0
    for _ in range(3):
        claim(queue, now)
        now += 60

    assert queue.claim_next(now) is None
    (dead,) = queue.list("dead")
    assert "stopped 3 times" in (dead.last_error or "")


def test_leases_of_a_killed_process_are_reclaimed_at_start(database_url: str, tmp_path: Path) -> None:
    path = database_url
    script = f"""
        import time
        from adapter.queue import JobQueue
        queue = JobQueue({str(path)!r})
        queue.enqueue("resource", "Claim", "c1", "1", None, "webhook")
        job = queue.claim_next(time.time())
        print("leased", job.id, flush=True)
        time.sleep(60)
        """
    with _killed_afterwards(script) as line:
        assert line.startswith("leased")
        with JobQueue(path) as alive:
            assert alive.reclaim_abandoned() == 0, "its holder is alive: the lease stands"
            assert alive.claim_next(time.time()) is None

    with JobQueue(path) as queue:  # lease_seconds: 300, none of it waited out
        assert queue.reclaim_abandoned() == 1
        job = queue.claim_next(time.time())
        assert job is not None and job.resource_id == "c1"
        assert job.attempts == 1, "the lost worker counts as an attempt"
        assert job.leased_by == queue.owner
        assert queue.reclaim_abandoned() == 0, "our own lease is not reclaimed"
    if database_url.startswith("sqlite"):
        owners = tmp_path / "data" / "queue.sqlite3.owners"
        assert list(owners.iterdir()) == [], "lock files go with their holders"


def test_a_live_holder_in_the_same_process_keeps_its_leases(database_url: str) -> None:
    path = database_url
    with JobQueue(path) as first, JobQueue(path) as second:
        first.enqueue("resource", "Claim", "c1", "1", None, "webhook")
        now = time.time()
        assert first.claim_next(now) is not None
        assert second.reclaim_abandoned() == 0
        assert second.claim_next(now) is None


# --- failures, backoff, dead letters -------------------------------------------------------


def test_transient_failures_back_off_exponentially_and_do_not_count_as_attempts(
    queue: JobQueue,
) -> None:
    add(queue)
    now = T0
    waits = []
    for _ in range(5):
        job = claim(queue, now)
        assert queue.retry_later(job.id, "503 from server", transient=True, now=now) == "pending"
        next_try = queue.get(job.id).not_before
        waits.append(next_try - now)
        now = next_try

    assert waits == [10.0, 20.0, 40.0, 80.0, 100.0]
    job = queue.get(job.id)
    assert (job.attempts, job.tries, job.last_error) == (0, 5, "503 from server")
    assert job.lease_until is None


def test_retry_after_replaces_the_backoff(queue: JobQueue) -> None:
    add(queue)
    job = claim(queue, T0)

    queue.retry_later(job.id, "429", transient=True, now=T0, retry_after=250.0)

    assert queue.get(job.id).not_before == T0 + 250.0


def test_transient_failures_go_dead_once_the_retry_window_is_over(queue: JobQueue) -> None:
    add(queue)
    job = claim(queue, T0)
    assert queue.retry_later(job.id, "down", transient=True, now=T0 + 3599) == "pending"

    job = claim(queue, T0 + 3700)
    assert queue.retry_later(job.id, "still down", transient=True, now=T0 + 3700) == "dead"

    (dead,) = queue.list("dead")
    assert "still down" in (dead.last_error or "") and "3700 s" in (dead.last_error or "")


def test_fatal_failures_dead_letter_after_n_attempts(queue: JobQueue) -> None:
    add(queue)
    now = T0
    states = []
    for _ in range(3):
        job = claim(queue, now)
        states.append(queue.retry_later(job.id, "400 bad request", transient=False, now=now))
        now = queue.get(job.id).not_before

    assert states == ["pending", "pending", "dead"]
    dead = queue.get(job.id)
    assert dead.state == "dead"
    assert dead.attempts == 3
    assert dead.last_error == "failed 3 times: 400 bad request"
    assert queue.claim_next(now + 10_000) is None


def test_dead_letter_now(queue: JobQueue) -> None:
    add(queue)
    job = claim(queue, T0)

    queue.dead_letter(job.id, "Claim was deleted")

    assert queue.get(job.id).last_error == "Claim was deleted"
    assert queue.counts() == {"pending": 0, "done": 0, "dead": 1}
    with pytest.raises(UsageError):
        queue.dead_letter(999, "nope")


def test_complete(queue: JobQueue) -> None:
    add(queue)
    job = claim(queue, T0)

    queue.complete(job.id)

    done = queue.get(job.id)
    assert (done.state, done.lease_until) == ("done", None)
    assert queue.claim_next(T0 + 10_000) is None


# --- operator actions ----------------------------------------------------------------------


def bury(queue: JobQueue, resource_id: str) -> int:
    add(queue, resource_id)
    job = claim(queue, T0)
    queue.dead_letter(job.id, "broken")
    return job.id


def test_retry_one_or_all_dead_jobs(queue: JobQueue, clock: Clock) -> None:
    a, b, c = (bury(queue, name) for name in "abc")
    clock.now = T0 + 500

    assert queue.retry(a) == 1
    assert queue.retry(a) == 0  # no longer dead
    revived = queue.get(a)
    assert (revived.state, revived.attempts, revived.tries) == ("pending", 0, 0)
    assert revived.window_start == revived.not_before == T0 + 500

    assert queue.retry() == 2
    assert {job.id for job in queue.list("pending")} == {a, b, c}


def test_purge_done_and_dead_but_never_pending(queue: JobQueue, clock: Clock) -> None:
    bury(queue, "a")
    add(queue, "b")
    queue.complete(claim(queue, T0).id)
    clock.now = T0 + 100
    add(queue, "c")
    queue.complete(claim(queue, T0 + 100).id)
    add(queue, "d")

    assert queue.purge("done", before=T0 + 50) == 1
    assert queue.purge("done") == 1
    assert queue.purge("dead") == 1
    with pytest.raises(UsageError):
        queue.purge("pending")
    assert queue.counts() == {"pending": 1, "done": 0, "dead": 0}


def test_list_rejects_unknown_states(queue: JobQueue) -> None:
    with pytest.raises(UsageError, match="in_progress"):
        queue.list("in_progress")  # type: ignore[arg-type]


def test_unknown_job_ids_are_usage_errors(queue: JobQueue) -> None:
    with pytest.raises(UsageError, match="no job 42"):
        queue.get(42)
    with pytest.raises(UsageError):
        queue.complete(42)
    with pytest.raises(UsageError):
        queue.retry_later(42, "x", transient=True, now=T0)


# --- service state -------------------------------------------------------------------------


def test_checkpoints(queue: JobQueue) -> None:
    assert queue.get_checkpoint("claim-catchup") is None

    queue.set_checkpoint("claim-catchup", "2026-07-24T12:00:00Z")
    queue.set_checkpoint("claim-catchup", "2026-07-24T12:05:00Z")

    assert queue.get_checkpoint("claim-catchup") == "2026-07-24T12:05:00Z"


def test_event_numbers_only_move_forward(queue: JobQueue) -> None:
    assert queue.last_event_number("Subscription/s1") is None

    assert queue.record_event_number("Subscription/s1", 21) is None
    assert queue.record_event_number("Subscription/s1", 23) == 21  # a gap the caller can see
    assert queue.record_event_number("Subscription/s1", 22) == 23  # late delivery

    assert queue.last_event_number("Subscription/s1") == 23
    assert queue.last_event_number("Subscription/s2") is None


def test_a_handshake_starts_event_numbers_afresh(queue: JobQueue) -> None:
    queue.record_event_number("Subscription/s1", 500)
    queue.record_event_number("Subscription/s2", 7)

    queue.forget_event_number("Subscription/s1")

    assert queue.last_event_number("Subscription/s1") is None
    assert queue.record_event_number("Subscription/s1", 1) is None
    assert queue.last_event_number("Subscription/s2") == 7


def test_purging_done_jobs_forgets_our_old_writes_too(queue: JobQueue, clock: Clock) -> None:
    queue.record_own_write("c1", "4")
    clock.now = T0 + 100
    queue.record_own_write("c2", "2")

    queue.purge("done", before=T0 + 50)
    assert not queue.is_own_write("c1", "4") and queue.is_own_write("c2", "2")
    queue.purge("dead")
    assert queue.is_own_write("c2", "2")
    queue.purge("done")  # `g0129 queue purge --state done`, after a server reset
    assert not queue.is_own_write("c2", "2")


def test_own_writes(queue: JobQueue) -> None:
    queue.record_own_write("c1", "4")
    queue.record_own_write("c1", "4")  # idempotent

    assert queue.is_own_write("c1", "4")
    assert not queue.is_own_write("c1", "5")
    assert not queue.is_own_write("c2", "4")


# --- durability and sharing ----------------------------------------------------------------


def test_state_survives_reopening(database_url: str) -> None:
    path = database_url
    with JobQueue(path) as queue:
        add(queue)
        queue.set_checkpoint("x", "1")
        queue.record_own_write("c1", "2")

    with JobQueue(path) as queue:
        assert [job.resource_id for job in queue.list("pending")] == ["c1"]
        assert queue.get_checkpoint("x") == "1"
        assert queue.is_own_write("c1", "2")


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "q.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    db.close()

    with pytest.raises(UsageError, match="newer"):
        JobQueue(path)


# The schema of adapter 0.1.0 (user_version 1), as files in the field have it.
SCHEMA_1 = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, resource_type TEXT NOT NULL, resource_id TEXT NOT NULL,
    version_id TEXT NOT NULL, payload BLOB, source TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, tries INTEGER NOT NULL DEFAULT 0, accepted_at REAL NOT NULL,
    window_start REAL NOT NULL, not_before REAL NOT NULL, lease_until REAL, last_error TEXT,
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX jobs_version ON jobs (resource_type, resource_id, version_id) WHERE version_id <> '';
CREATE INDEX jobs_ready ON jobs (state, not_before);
CREATE TABLE checkpoints (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE event_numbers (subscription TEXT PRIMARY KEY, number INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE own_writes (
    claim_id TEXT NOT NULL, version_id TEXT NOT NULL, written_at REAL NOT NULL,
    PRIMARY KEY (claim_id, version_id)
) WITHOUT ROWID;
INSERT INTO jobs (kind, resource_type, resource_id, version_id, source, state, accepted_at, window_start, not_before, updated_at)
    VALUES ('resource', 'Claim', 'c1', '1', 'rest-hook', 'done', 1, 1, 1, 1);
INSERT INTO jobs (kind, resource_type, resource_id, version_id, source, state, accepted_at, window_start, not_before, lease_until, updated_at)
    VALUES ('resource', 'Encounter', 'e1', '3', 'rest-hook', 'pending', 1, 1, 1, 9e15, 1);
INSERT INTO jobs (kind, resource_type, resource_id, version_id, source, state, accepted_at, window_start, not_before, updated_at)
    VALUES ('catch-up', 'Subscription', 'catch-up', '', 'timer', 'pending', 1, 1, 1, 1);
INSERT INTO jobs (kind, resource_type, resource_id, version_id, source, state, accepted_at, window_start, not_before, lease_until, updated_at)
    VALUES ('catch-up', 'Subscription', 'catch-up', '', 'timer', 'pending', 2, 2, 2, 9e15, 2);
INSERT INTO checkpoints VALUES ('lastUpdated', '2026-07-24T12:00:00Z');
INSERT INTO event_numbers VALUES ('Subscription/s1', 21);
INSERT INTO own_writes VALUES ('c1', '2', 1);
PRAGMA user_version=1;
"""


def test_a_schema_1_queue_opens_and_is_migrated_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "q.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    db.close()

    with JobQueue(path) as queue:
        done, superseded = queue.list("done")
        assert (done.resource_id, done.last_updated, done.leased_by) == ("c1", "", None)
        assert superseded.kind == CATCH_UP and "one catch-up at a time" in (superseded.last_error or "")
        assert queue.get_checkpoint("lastUpdated") == "2026-07-24T12:00:00Z"
        assert queue.last_event_number("Subscription/s1") == 21
        assert queue.is_own_write("c1", "2")
        # The piled-up catch-ups are one; the lease of the old service (no holder) ends.
        assert [j.kind for j in queue.list("pending")] == ["resource", "catch-up"]
        assert queue.reclaim_abandoned() == 1
        assert claim(queue, time.time()).resource_id == "e1"
        # The old (type, id, version) index is gone: version 1 with its lastUpdated is new work.
        assert queue.enqueue("resource", "Claim", "c1", "1", None, "rest-hook", AFTER_RESET)
        assert not queue.enqueue("resource", "Claim", "c1", "1", None, "rest-hook", AFTER_RESET)

    def schema() -> tuple[int, set[str]]:
        db = sqlite3.connect(path)
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            return version, {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        finally:
            db.close()

    version, indexes = schema()
    assert version == 4 and "jobs_version" not in indexes and "jobs_key" in indexes
    with JobQueue(path) as queue:  # opening a migrated file changes nothing
        assert queue.counts() == {"pending": 3, "done": 2, "dead": 0}
    assert schema() == (version, indexes)


def test_a_schema_3_lock_held_while_its_replica_is_upgraded_is_kept(tmp_path: Path) -> None:
    # Schema 3's locks had no release number: the column is added, the lock held stays held.
    path = tmp_path / "queue.sqlite3"
    with JobQueue(path) as old:
        token = old.try_lock("Patient/p1", 3600.0)
        assert token is not None
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE locks DROP COLUMN released; DROP TABLE counters; PRAGMA user_version = 3;")
    db.close()
    with JobQueue(path) as queue:
        reading = queue.lock_serial()
        assert queue.try_lock("Patient/p1", 60.0) is not None, "its holder is gone: taken over"
        assert queue.released_since(["Patient/p1"], reading)


def test_kill_9_loses_no_accepted_job(database_url: str) -> None:
    path = database_url
    script = f"""
        import sys, time
        from adapter.queue import JobQueue
        queue = JobQueue({str(path)!r})
        for n in range(20):
            queue.enqueue("claim", "Claim", f"c{{n}}", "1", None, "webhook")
        print("accepted", flush=True)
        time.sleep(60)
        """
    with _killed_afterwards(script) as line:
        assert line == "accepted"

    with JobQueue(path) as queue:
        assert queue.counts()["pending"] == 20
        assert {job.resource_id for job in queue.list("pending")} == {f"c{n}" for n in range(20)}


def test_threads_never_claim_the_same_job_twice(database_url: str) -> None:
    # Two instances (two replicas' connections), two threads each.
    with JobQueue(database_url) as queue, JobQueue(database_url) as other:
        for n in range(200):
            queue.enqueue("claim", "Claim", f"c{n}", "1", None, "test")
        claimed: list[int] = []

        def worker(queue: JobQueue) -> None:
            while (job := queue.claim_next(T0 * 10_000)) is not None:
                claimed.append(job.id)
                queue.complete(job.id)

        threads = [threading.Thread(target=worker, args=(q,)) for q in (queue, other, queue, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert sorted(claimed) == sorted(set(claimed))
        assert len(claimed) == 200
        assert queue.counts() == {"pending": 0, "done": 200, "dead": 0}


def test_from_settings_puts_the_file_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"G0129_DATA_DIR": str(tmp_path / "state")})

    with JobQueue.from_settings(settings) as queue:
        assert queue.path == tmp_path / "state" / "queue.sqlite3"
        assert queue.path.exists()


def test_an_own_write_is_told_from_a_version_a_reset_server_made_anew(database_url: str) -> None:
    with JobQueue(database_url) as queue:
        queue.record_own_write("c1", "2", "2026-01-01T00:00:00.010Z")
        assert queue.is_own_write("c1", "2", "2026-01-01T00:00:00.01+00:00"), "the same instant, spelt otherwise"
        assert queue.is_own_write("c1", "2"), "a notification without lastUpdated: the version decides"
        assert not queue.is_own_write("c1", "2", "2026-03-09T12:00:00Z"), "version 2 again, after a reset"
        assert not queue.is_own_write("c1", "3")


# --- replicas: named locks, migrations ------------------------------------------------------


def test_a_lock_has_one_holder_until_released_or_expired(database_url: str, clock: Clock) -> None:
    with JobQueue(database_url, clock=clock) as one, JobQueue(database_url, clock=clock) as two:
        token = one.try_lock("Patient/p1", 30.0)
        assert token is not None
        assert two.try_lock("Patient/p1", 30.0) is None, "another replica"
        assert one.try_lock("Patient/p1", 30.0) is None, "another task of the same replica"
        assert two.try_lock("Patient/p2", 30.0) is not None, "another patient"

        one.unlock("Patient/p1", token)
        again = two.try_lock("Patient/p1", 30.0)
        assert again is not None
        one.unlock("Patient/p1", token)  # a stale token releases nothing
        assert one.try_lock("Patient/p1", 30.0) is None

        clock.now += 30.0  # the holder hung: its lock runs out
        assert one.try_lock("Patient/p1", 30.0) is not None


def test_a_release_since_a_reading_began_is_seen_once_the_lock_is_held(database_url: str, clock: Clock) -> None:
    # A writer learns which lock guards what it read only from what it read: it notes the count
    # of releases before reading, and once it holds the lock asks whether it was let go since.
    with JobQueue(database_url, clock=clock) as one, JobQueue(database_url, clock=clock) as two:
        before = one.lock_serial()
        token = one.try_lock("Patient/p1", 30.0)
        assert token is not None
        assert not one.released_since(["Patient/p1"], before), "nobody else held it"
        one.unlock("Patient/p1", token)

        reading = two.lock_serial()  # two begins reading; one takes the lock, writes, lets go
        token = one.try_lock("Patient/p1", 30.0)
        assert token is not None
        one.unlock("Patient/p1", token)
        mine = two.try_lock("Patient/p1", 30.0)
        assert mine is not None, "free when asked for"
        assert two.released_since(["Patient/p2", "Patient/p1"], reading), "yet held since the reading began"
        assert not two.released_since(["Patient/p1"], two.lock_serial())
        count = two.lock_serial()
        two.unlock("Patient/p1", mine)
        two.unlock("Patient/p1", mine)  # a stale token releases nothing, and counts nothing
        assert one.lock_serial() == count + 1

        reading = one.lock_serial()
        assert two.try_lock("Patient/p1", 30.0) is not None
        clock.now += 30.0  # its holder overran: it may have written before its lock ran out
        assert one.try_lock("Patient/p1", 30.0) is not None
        assert one.released_since(["Patient/p1"], reading), "a take-over is a release"


def test_released_locks_are_forgotten_with_the_done_jobs(database_url: str, clock: Clock) -> None:
    with JobQueue(database_url, clock=clock) as queue:
        reading = queue.lock_serial()
        token = queue.try_lock("Patient/p1", 30.0)
        assert token is not None
        queue.unlock("Patient/p1", token)
        clock.now += 100
        queue.purge("done", before=clock.now - 200)
        assert queue.released_since(["Patient/p1"], reading), "a recent release is kept"
        queue.purge("done", before=clock.now)
        assert not queue.released_since(["Patient/p1"], reading)
        assert queue.lock_serial() == reading + 1, "the count goes on"
        assert queue.try_lock("Patient/p1", 30.0) is not None


def test_the_lock_of_a_killed_process_is_taken_over_at_once(database_url: str) -> None:
    script = f"""
        import time
        from adapter.queue import JobQueue
        queue = JobQueue({database_url!r})
        assert queue.try_lock("Patient/p1", 3600.0)
        print("locked", flush=True)
        time.sleep(60)
        """
    with _killed_afterwards(script) as line:
        assert line == "locked"
        with JobQueue(database_url) as queue:
            assert queue.try_lock("Patient/p1", 60.0) is None, "its holder lives"
    with JobQueue(database_url) as queue:
        assert queue.try_lock("Patient/p1", 60.0) is not None, "an hour early: its holder is dead"


def test_a_new_sqlite_queue_waits_for_another_replicas_write_lock(tmp_path: Path) -> None:
    # A replica holding the write lock of a new file, before any has put it in WAL mode: SQLite
    # refuses the switch at once rather than wait (what made starting together fail now and then).
    path = tmp_path / "queue.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.2, other.execute, ("COMMIT",))
        release.start()
        with JobQueue(path) as queue:
            assert add(queue) and not add(queue)
        release.join()
    finally:
        other.close()


def test_replicas_starting_together_migrate_once(database_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            JobQueue(database_url).close()
        except BaseException as exc:  # collected: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with JobQueue(database_url) as queue:
        assert add(queue) and not add(queue)


def test_a_newer_postgresql_schema_is_refused(postgres_url: str) -> None:
    import psycopg

    JobQueue(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(UsageError, match="newer adapter"):
        JobQueue(postgres_url)


def test_an_unknown_database_url_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="G0129_DATABASE_URL"):
        JobQueue("mysql://db/g0129")


# --- group commit --------------------------------------------------------------------------


def test_group_commit_stores_concurrent_requests_in_few_transactions(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with JobQueue(database_url) as queue:
        transactions: list[int] = []
        real = queue.enqueue_many

        def counted(jobs: Iterable[NewJob]) -> list[bool]:
            batch = list(jobs)
            transactions.append(len(batch))
            return real(batch)

        monkeypatch.setattr(queue, "enqueue_many", counted)
        intake = GroupCommit(queue)

        async def requests() -> list[list[bool]]:
            # 100 requests at once, each with its own answer: a repeat is told apart, even
            # within one batch, in the order the requests came.
            one = [intake.enqueue([NewJob("resource", "Encounter", f"e{n}", "1", None, "test", BEFORE_RESET)]) for n in range(100)]
            repeat = [intake.enqueue([NewJob("resource", "Encounter", "e7", "1", None, "test", BEFORE_RESET), NewJob(CATCH_UP, "Subscription", CATCH_UP)])]
            return await asyncio.gather(*one, *repeat)

        answers = asyncio.run(requests())
        assert answers == [[True]] * 100 + [[False, True]]
        assert sum(transactions) == 102 and len(transactions) < 10, transactions
        assert queue.counts()["pending"] == 101


def test_group_commit_fails_every_request_of_a_failed_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with JobQueue(tmp_path / "q.sqlite3") as queue:
        def broken(jobs: Iterable[NewJob]) -> list[bool]:
            raise OSError("disk full")

        monkeypatch.setattr(queue, "enqueue_many", broken)
        intake = GroupCommit(queue)

        async def requests() -> list[list[bool] | BaseException]:
            return await asyncio.gather(*(intake.enqueue([NewJob("resource", "Encounter", f"e{n}")]) for n in range(5)), return_exceptions=True)

        assert all(isinstance(answer, OSError) for answer in asyncio.run(requests()))
