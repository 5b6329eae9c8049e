"""The worker against a FHIR server (respx routes every call to an in-memory FHIR server)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import orjson
import pytest
import respx

from adapter.vocabulary import DECISION_EXTENSION, TAG_SYSTEM
from adapter.fhir_client import FHIRClient
from adapter.metrics import Metrics
from adapter.queue import Job, JobQueue
from adapter.retry import RetryPolicy
from adapter.ruleset import RuleSet
from adapter import worker as worker_module
from adapter.worker import CATCH_UP, CHECKPOINT, RESOURCE, Worker

from .conftest import FIXTURES
from .fakefhir import FakeFHIR

BASE = "http://fhir.test/fhir"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture
def fake() -> Iterator[FakeFHIR]:
    server = FakeFHIR(BASE)
    bundle = orjson.loads((FIXTURES / "01-medicare-php-hospital.json").read_bytes())
    server.load(*(e["resource"] for e in bundle["entry"]))
    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="fhir.test").mock(side_effect=server)
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def worker(tmp_path: Path, fake: FakeFHIR, ruleset: RuleSet, clock: Clock) -> Iterator[Worker]:
    queue = JobQueue(tmp_path / "queue.sqlite3", clock=clock, dead_letter_attempts=3)
    client = FHIRClient(BASE, retry=RetryPolicy(max_attempts=3), sleep=_no_sleep)
    metrics = Metrics(queue.counts)
    yield Worker(queue, client, ruleset, metrics, clock=clock)
    asyncio.run(client.aclose())
    queue.close()


def run(worker: Worker, times: int = 1) -> list[bool]:
    return [asyncio.run(worker.run_once()) for _ in range(times)]


def metric(worker: Worker, name: str, labels: dict[str, str] | None = None) -> float:
    return worker.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def claim_writes(fake: FakeFHIR) -> list[dict[str, Any]]:
    """The Claim entries of every transaction the adapter sent."""
    out = []
    for request in fake.writes("POST"):
        body = orjson.loads(request.content)
        if body.get("type") == "transaction":
            out.extend(e for e in body["entry"] if e["resource"]["resourceType"] == "Claim")
    return out


def test_a_change_is_decided_and_written_back_with_provenance(worker: Worker, fake: FakeFHIR) -> None:
    assert worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    assert run(worker) == [True]
    claim = fake.current("Claim", "php01-claim")
    assert claim["meta"]["versionId"] == "2"
    g0129 = [i for i in claim["item"] if i["productOrService"]["coding"][0]["code"] == "G0129"]
    assert [(i["quantity"]["value"], i["servicedDate"]) for i in g0129] == [(1, "2025-03-04")]
    assert any(e["url"] == DECISION_EXTENSION for e in claim["extension"])
    assert {"system": TAG_SYSTEM, "code": "annotated"}.items() <= claim["meta"]["tag"][0].items()
    provenances = fake.all("Provenance")
    # One recipe: the version written, what it was made from (version-specific), the adapter.
    provenance = provenances[0]
    assert len(provenances) == 1 and provenance["target"] == [{"reference": "Claim/php01-claim/_history/2"}]
    assert [e["what"]["reference"] for e in provenance["entity"]] == [
        "Claim/php01-claim/_history/1", "Encounter/php01-enc/_history/1", "Procedure/php01-ot1/_history/1",
    ]
    assert provenance["agent"][0]["who"]["reference"] == "#adapter"
    assert provenance["contained"][0]["resourceType"] == "Device"
    assert provenance["activity"]["coding"][0]["code"] == "UPDATE"
    assert provenance["reason"][0]["coding"][0]["code"] == "HPAYMT"
    assert claim_writes(fake)[0]["request"]["ifMatch"] == 'W/"1"'
    assert worker.queue.is_own_write("php01-claim", "2")
    assert worker.queue.counts()["pending"] == 0
    assert metric(worker, "g0129_decisions_total", {"outcome": "bill"}) == 1
    assert metric(worker, "g0129_writebacks_total", {"result": "updated"}) == 1


def test_gathering_takes_two_round_trips(worker: Worker, fake: FakeFHIR) -> None:
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    run(worker)
    reads = [r for r in fake.requests if not (r.method == "POST" and orjson.loads(r.content)["type"] == "transaction")]
    assert len(reads) == 2  # Encounter search with includes, then one batch


def test_our_own_write_echo_is_ignored(worker: Worker, fake: FakeFHIR) -> None:
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    run(worker)
    sent = len(fake.requests)
    own = fake.current("Claim", "php01-claim")
    worker.queue.enqueue(RESOURCE, "Claim", "php01-claim", "2", orjson.dumps(own), "rest-hook")
    run(worker)
    assert len(fake.requests) == sent, "no read, no write for our own version"
    assert metric(worker, "g0129_writebacks_total", {"result": "own-echo"}) == 1


def test_duplicates_are_processed_once_and_unchanged_inputs_write_nothing(worker: Worker, fake: FakeFHIR) -> None:
    assert worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    assert not worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    run(worker, 2)
    assert len(claim_writes(fake)) == 1
    # Another change that does not alter the decision: decided again, nothing written.
    worker.queue.enqueue(RESOURCE, "Procedure", "php01-ot1", "1", None, "test")
    run(worker)
    assert len(claim_writes(fake)) == 1
    assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "2"
    assert metric(worker, "g0129_writebacks_total", {"result": "unchanged"}) == 1


def biller_edits(server: FakeFHIR) -> None:
    """A biller's note added to the Claim on the server (a new version of it)."""
    claim = dict(server.current("Claim", "php01-claim"))
    claim["supportingInfo"] = claim["supportingInfo"] + [{
        "sequence": 3, "category": {"coding": [{"code": "info"}]},
        "valueString": "Biller: hold until the physician certification is signed.",
    }]
    server.put(claim)


def test_version_conflict_rereads_and_keeps_the_billers_edit(worker: Worker, fake: FakeFHIR) -> None:
    fake.before_transaction.append(biller_edits)
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    run(worker)
    claim = fake.current("Claim", "php01-claim")
    assert claim["meta"]["versionId"] == "3"
    assert claim["supportingInfo"][2]["valueString"].startswith("Biller")
    assert sum(1 for i in claim["item"] if i["productOrService"]["coding"][0]["code"] == "G0129") == 1
    writes = claim_writes(fake)
    assert [w["request"]["ifMatch"] for w in writes] == ['W/"1"', 'W/"2"']
    assert metric(worker, "g0129_writebacks_total", {"result": "conflict"}) == 1
    assert len(fake.all("Provenance")) == 1


def test_412_is_a_conflict_too(worker: Worker, fake: FakeFHIR) -> None:
    # HAPI answers 409; a server that follows the spec answers 412. Both mean re-read.
    fake.before_transaction.append(
        lambda server: httpx.Response(412, json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "conflict"}]})
    )
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    run(worker)
    assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "2"
    assert metric(worker, "g0129_writebacks_total", {"result": "conflict"}) == 1
    assert metric(worker, "g0129_writebacks_total", {"result": "updated"}) == 1


def test_503_then_success(worker: Worker, fake: FakeFHIR) -> None:
    fake.fail_next = [503]
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    run(worker)
    assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "2"
    assert [r.method for r in fake.requests[:2]] == ["GET", "GET"], "the failed search was retried"


def test_an_outage_keeps_the_job_pending_with_backoff(worker: Worker, fake: FakeFHIR, clock: Clock) -> None:
    fake.fail_next = [httpx.ConnectError("connection refused")] * 3
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    run(worker)
    [job] = worker.queue.list("pending")
    assert job.not_before > clock.now and "ConnectError" in (job.last_error or "")
    assert worker.queue.counts()["dead"] == 0
    assert run(worker) == [False], "not due yet"
    clock.now = job.not_before
    run(worker)
    assert worker.queue.counts() == {"pending": 0, "done": 1, "dead": 0}


def test_timeouts_and_429_retry_after(worker: Worker, fake: FakeFHIR, clock: Clock) -> None:
    fake.fail_next = [httpx.ReadTimeout("slow"), httpx.ReadTimeout("slow")]
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    run(worker)
    assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "2"

    fake.fail_next = [httpx.Response(429, headers={"Retry-After": "120"})] * 3
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "2", None, "test")
    run(worker)
    [job] = worker.queue.list("pending")
    assert job.not_before == pytest.approx(clock.now + 120)


def _fail_until_dead(worker: Worker, fake: FakeFHIR, clock: Clock) -> Job:
    """A job the server answers 400 every time, run until the queue gives up (3 attempts)."""
    fake.fail_next = [400] * 10
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    for _ in range(3):
        [job] = worker.queue.list("pending")
        clock.now = max(clock.now, job.not_before)
        run(worker)
    return job


def test_dead_letter_after_n_failures_retrying_cannot_fix(worker: Worker, fake: FakeFHIR, clock: Clock) -> None:
    _fail_until_dead(worker, fake, clock)
    [dead] = worker.queue.list("dead")
    assert "400" in (dead.last_error or "")
    assert metric(worker, "g0129_dead_letters_total") == 1


def test_catch_up_queues_what_changed_since_the_checkpoint(worker: Worker, fake: FakeFHIR) -> None:
    worker.queue.set_checkpoint(CHECKPOINT, "2025-01-01T00:00:00+00:00")
    queued = asyncio.run(worker.catch_up())
    assert queued == 4  # the Encounter, its two Procedures (evaluation, session), the Claim
    assert asyncio.run(worker.catch_up()) == 0, "the same versions are not queued twice"
    enc = dict(fake.current("Encounter", "php01-enc"))
    fake.put(enc)
    assert asyncio.run(worker.catch_up()) == 1
    assert worker.queue.get_checkpoint(CHECKPOINT) == fake.current("Encounter", "php01-enc")["meta"]["lastUpdated"]


def test_catch_up_job_runs_through_the_queue(worker: Worker, fake: FakeFHIR) -> None:
    worker.queue.set_checkpoint(CHECKPOINT, "2025-01-01T00:00:00+00:00")
    worker.queue.enqueue(CATCH_UP, "Subscription", CATCH_UP, "", None, "test")
    while run(worker) == [True]:
        pass
    assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "2"
    assert len(claim_writes(fake)) == 1


def test_no_claim_yet_creates_one_draft_only(worker: Worker, fake: FakeFHIR) -> None:
    del fake.store[("Claim", "php01-claim")]
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    worker.queue.enqueue(RESOURCE, "Procedure", "php01-ot1", "1", None, "test")
    run(worker, 2)
    drafts = fake.all("Claim")
    assert len(drafts) == 1 and drafts[0]["status"] == "draft"
    assert claim_writes(fake)[0]["request"]["ifNoneExist"].endswith("|Encounter/php01-enc")


def test_the_loop_survives_a_failing_state_store(worker: Worker, fake: FakeFHIR, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    real = worker.queue.claim_next
    failures = [sqlite3.OperationalError("database is locked")]

    def flaky(now: float) -> Any:
        if failures:
            raise failures.pop()
        return real(now)

    monkeypatch.setattr(worker.queue, "claim_next", flaky)
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop, idle=0.01))
        for _ in range(200):
            if worker.queue.counts()["done"]:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(main())
    assert worker.queue.counts()["done"] == 1
    assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "2"


# -- the log lines (one per decision, write-back, conflict, retry, dead letter) --------------------


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="adapter")
    return caplog


def test_a_decision_and_its_write_back_are_one_line_each(worker: Worker, logs: pytest.LogCaptureFixture) -> None:
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    [job] = worker.queue.list("pending")
    run(worker)
    [decision] = events(logs, "decision")
    assert (decision.job, decision.claim, decision.encounters, decision.outcome) == (  # type: ignore[attr-defined]
        job.id, "Claim/php01-claim", ["Encounter/php01-enc"], "bill",
    )
    assert decision.levelno == logging.INFO and decision.getMessage().startswith("Encounter/php01-enc on Claim/php01-claim: bill")
    [write] = events(logs, "write-back")
    assert (write.job, write.claim, write.encounters, write.outcome, write.version) == (  # type: ignore[attr-defined]
        job.id, "Claim/php01-claim", ["Encounter/php01-enc"], "updated", "2",
    )
    # Decided again with nothing new: the write-back line says unchanged.
    worker.queue.enqueue(RESOURCE, "Procedure", "php01-ot1", "1", None, "test")
    run(worker)
    assert [r.outcome for r in events(logs, "write-back")] == ["updated", "unchanged"]  # type: ignore[attr-defined]
    assert len(events(logs, "decision")) == 2


def test_a_conflict_is_logged_with_the_claim_and_its_encounters(worker: Worker, fake: FakeFHIR, logs: pytest.LogCaptureFixture) -> None:
    fake.before_transaction.append(lambda server: server.put(dict(server.current("Claim", "php01-claim"))))
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
    [job] = worker.queue.list("pending")
    run(worker)
    [conflict] = events(logs, "conflict")
    assert conflict.levelno == logging.WARNING
    assert (conflict.job, conflict.claim, conflict.encounters, conflict.outcome) == (  # type: ignore[attr-defined]
        job.id, "Claim/php01-claim", ["Encounter/php01-enc"], "re-deciding",
    )
    assert [r.outcome for r in events(logs, "write-back")] == ["updated"]  # type: ignore[attr-defined]


def test_retries_and_the_dead_letter_are_logged(worker: Worker, fake: FakeFHIR, clock: Clock, logs: pytest.LogCaptureFixture) -> None:
    job = _fail_until_dead(worker, fake, clock)
    retries, [dead] = events(logs, "retry"), events(logs, "dead-letter")
    assert [(r.outcome, r.tries) for r in retries] == [("pending", 1), ("pending", 2)]  # type: ignore[attr-defined]
    assert dead.levelno == logging.ERROR
    assert (dead.job, dead.encounters, dead.outcome, dead.resource) == (  # type: ignore[attr-defined]
        job.id, ["Encounter/php01-enc"], "dead", "Encounter/php01-enc/_history/1",
    )
    assert "400" in dead.error  # type: ignore[attr-defined]
    assert not events(logs, "decision"), "nothing was decided"


def test_dry_run_logs_each_claim_diff_as_a_json_patch(tmp_path: Path, fake: FakeFHIR, ruleset: RuleSet, clock: Clock, logs: pytest.LogCaptureFixture) -> None:
    queue = JobQueue(tmp_path / "queue.sqlite3", clock=clock)
    client = FHIRClient(BASE, retry=RetryPolicy(max_attempts=1), sleep=_no_sleep)
    dry = Worker(queue, client, ruleset, Metrics(queue.counts), dry_run=True, clock=clock)
    try:
        queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")
        run(dry)
    finally:
        asyncio.run(client.aclose())
        queue.close()
    assert claim_writes(fake) == [], "a dry run writes nothing"
    [line] = events(logs, "write-back")
    assert (line.claim, line.outcome) == ("Claim/php01-claim", "dry-run")  # type: ignore[attr-defined]
    patch = list(line.patch)  # type: ignore[attr-defined]
    assert patch and {op["op"] for op in patch} <= {"add", "remove", "replace", "move", "copy", "test"}
    server = fake.current("Claim", "php01-claim")
    annotated = jsonpatch.apply_patch(server, patch)
    assert annotated["meta"]["tag"][0]["code"] == "annotated"
    assert any(e["url"] == DECISION_EXTENSION for e in annotated["extension"])


# -- replicas: several workers on one queue -----------------------------------------------------


def replica(database_url: str, ruleset: RuleSet, concurrency: int = 1, catch_up_interval: float = 60.0) -> Worker:
    """A worker with a queue instance (a connection, a lease holder) of its own, as each
    `g0129 serve` process has."""
    queue = JobQueue(database_url, dead_letter_attempts=3)
    client = FHIRClient(BASE, retry=RetryPolicy(max_attempts=3), sleep=_no_sleep)
    return Worker(queue, client, ruleset, Metrics(queue.counts), concurrency=concurrency, catch_up_interval=catch_up_interval)


async def drain(workers: list[Worker], queue: JobQueue) -> None:
    """Run the workers together until nothing is pending, then stop them."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop, idle=0.01)) for w in workers]
    for _ in range(1000):
        if queue.counts()["pending"] == 0:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*tasks)


def test_a_job_waits_while_another_writer_holds_its_patient(database_url: str, fake: FakeFHIR, ruleset: RuleSet) -> None:
    worker = replica(database_url, ruleset)
    other = JobQueue(database_url)  # another replica, in the middle of writing this patient's Claims
    token = other.try_lock("Patient/php01-pat", 60.0)
    assert token is not None
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")

    async def main() -> None:
        job = asyncio.create_task(worker.run_once())
        await asyncio.sleep(0.3)
        assert not job.done() and claim_writes(fake) == [], "no write while the other holds the patient"
        await asyncio.to_thread(other.unlock, "Patient/php01-pat", token)
        assert await job is True
        await worker.client.aclose()

    asyncio.run(main())
    assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "2"
    # The job gathered again once it had the lock: it decided from what the other left.
    assert len([r for r in fake.requests if r.method == "GET" and "_revinclude" in str(r.url)]) == 2
    other.close()
    worker.queue.close()


def test_a_write_between_a_jobs_read_and_its_lock_makes_it_read_again(
    database_url: str, fake: FakeFHIR, ruleset: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica takes the patient's lock, writes the Claim and lets go, all after this job
    read the Claim and before it asks for the lock (seen once in CI on PostgreSQL). The lock is
    free when asked for, yet what the job read is stale: the release since its read says so, and
    it reads again and writes on the other's version, with no conflict."""
    worker = replica(database_url, ruleset)
    other = JobQueue(database_url)
    gather = worker_module.gather
    reads = 0

    async def gather_then_another_writes(*args: Any) -> Any:
        nonlocal reads
        index = await gather(*args)
        reads += 1
        if reads == 1:
            token = await asyncio.to_thread(other.try_lock, "Patient/php01-pat", 60.0)
            assert token is not None
            biller_edits(fake)  # the other's write, lock held
            await asyncio.to_thread(other.unlock, "Patient/php01-pat", token)
        return index

    monkeypatch.setattr(worker_module, "gather", gather_then_another_writes)
    worker.queue.enqueue(RESOURCE, "Encounter", "php01-enc", "1", None, "test")

    async def main() -> None:
        assert await worker.run_once() is True
        await worker.client.aclose()

    asyncio.run(main())
    assert reads == 2
    assert [w["request"]["ifMatch"] for w in claim_writes(fake)] == ['W/"2"']
    assert metric(worker, "g0129_writebacks_total", {"result": "conflict"}) == 0
    claim = fake.current("Claim", "php01-claim")
    assert claim["meta"]["versionId"] == "3"
    assert claim["supportingInfo"][2]["valueString"].startswith("Biller")
    other.close()
    worker.queue.close()


def test_replicas_with_jobs_in_flight_write_each_claim_once(database_url: str, fake: FakeFHIR, ruleset: RuleSet) -> None:
    """Three notifications touching one Claim, two replicas with four jobs in flight each: one
    write, and no stale one. A job that meets the patient's lock held waits, then finds nothing
    to do; so does one whose lock was released since it began reading (the test above)."""
    workers = [replica(database_url, ruleset, concurrency=4) for _ in range(2)]
    queue = workers[0].queue
    for rtype, rid in (("Encounter", "php01-enc"), ("Procedure", "php01-ot1"), ("Claim", "php01-claim")):
        queue.enqueue(RESOURCE, rtype, rid, "1", None, "test")

    async def main() -> None:
        await drain(workers, queue)
        for w in workers:
            await w.client.aclose()

    asyncio.run(main())
    assert queue.counts() == {"pending": 0, "done": 3, "dead": 0}
    assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "2"  # written once
    assert [w["request"]["ifMatch"] for w in claim_writes(fake)] == ['W/"1"']
    assert sum(metric(w, "g0129_writebacks_total", {"result": "conflict"}) for w in workers) == 0
    for w in workers:
        w.queue.close()


def test_one_catch_up_timer_across_replicas(database_url: str, fake: FakeFHIR, ruleset: RuleSet) -> None:
    workers = [replica(database_url, ruleset, catch_up_interval=3600.0) for _ in range(3)]
    queue = workers[0].queue

    async def tick() -> None:
        stop = asyncio.Event()
        ticks = [asyncio.create_task(w.tick_catch_up(stop)) for w in workers]
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*ticks)

    asyncio.run(tick())
    (timer,) = queue.list("pending")
    assert (timer.kind, timer.source) == (CATCH_UP, "timer")
    queue.complete(timer.id)
    # The timers tick on (restarted loops here: each looks at once), within the interval: no second one.
    asyncio.run(tick())
    assert queue.list("pending") == []
    for w in workers:
        asyncio.run(w.client.aclose())
        w.queue.close()
