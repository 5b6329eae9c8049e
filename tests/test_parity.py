"""Replay and the sidecar decide alike: same decisions, same Claim, one write per Claim.

Every fixture is decided twice: by `g0129 replay` on the file, and by the worker after the
same resources are stored in the in-memory FHIR server (through the client's transport seam),
one notification per Encounter as an EHR would send them. The decisions must be equal, the
Claim the worker leaves on the server must be the Claim the replay writes (less what a server
adds: versions, server-assigned ids, resolved `urn:uuid` references), and each Claim that
changes is written exactly once: a second notification for another day of the same Claim, or
a replay of all of them, writes nothing.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from adapter import jsonio
from adapter.fhir_client import FHIRClient
from adapter.metrics import Metrics
from adapter.queue import JobQueue
from adapter.retry import RetryPolicy
from adapter.ruleset import RuleSet
from adapter.review import task_key
from adapter.vocabulary import DRAFT_IDENTIFIER_SYSTEM
from adapter.worker import RESOURCE, Worker

from .conftest import AUTH, SCENARIO_DIRS, serve
from .fakefhir import FakeFHIR, rewrite_references
from .golden import TASK_OWNER, claims_by_fixture, tasks_by_fixture

BASE = "http://fhir.test/fhir"
SCENARIOS = sorted(p for d in SCENARIO_DIRS for p in d.iterdir() if p.suffix in (".json", ".ndjson") and ".expected." not in p.name)


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture(scope="module")
def replayed() -> dict[Path, list[dict[str, Any]]]:
    return claims_by_fixture()


@pytest.fixture(scope="module")
def golden_tasks() -> dict[Path, list[dict[str, Any]]]:
    return tasks_by_fixture()


def _task_comparable(task: dict[str, Any], fake: FakeFHIR | None = None) -> dict[str, Any]:
    """A review Task less what the write changes: its server id and versions, its lastModified,
    and its focus, which on the server names the Claim the server holds (checked against the
    identifier here: a draft has the server's id)."""
    if fake is not None:
        claim = fake.current(*task["focus"]["reference"].split("/"))
        assert claim is not None and task_key(task["focus"]["reference"], claim) == task["identifier"][0]["value"]
    out = {k: v for k, v in task.items() if k not in ("id", "meta", "lastModified", "focus")}
    return out | {"meta": {k: v for k, v in task["meta"].items() if k not in ("versionId", "lastUpdated")}}


@pytest.fixture(scope="module")
def replay_decisions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    from adapter.cli import main

    out = tmp_path_factory.mktemp("replay")
    main(["replay", *map(str, SCENARIO_DIRS), "--out", str(out)], stdout=io.StringIO(), stderr=io.StringIO())
    return {d["encounter"]: d for d in map(orjson.loads, (out / "decisions.ndjson").read_bytes().splitlines())}


def _transactions(fake: FakeFHIR) -> list[dict[str, Any]]:
    bodies = [orjson.loads(r.content) for r in fake.requests if r.method == "POST" and r.content]
    return [b for b in bodies if b.get("type") == "transaction"]


def _comparable(claim: dict[str, Any]) -> dict[str, Any]:
    """A Claim less what storing it on a server changes: versions, and a draft's server id."""
    out = {k: v for k, v in claim.items() if k != "meta"}
    meta = {k: v for k, v in (claim.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    if any(i.get("system") == DRAFT_IDENTIFIER_SYSTEM for i in claim.get("identifier", [])):
        out.pop("id", None)
    return out


@pytest.fixture
def worker_for(tmp_path: Path, ruleset: RuleSet) -> Iterator[Any]:
    made: list[tuple[Worker, FHIRClient, JobQueue]] = []

    def make(fake: FakeFHIR) -> Worker:
        queue = JobQueue(tmp_path / f"queue{len(made)}.sqlite3")
        client = FHIRClient(BASE, retry=RetryPolicy(max_attempts=2), sleep=_no_sleep, transport=httpx.MockTransport(fake))
        worker = Worker(queue, client, ruleset, Metrics(queue.counts), review_owner=TASK_OWNER)
        made.append((worker, client, queue))
        return worker

    yield make
    for _, client, queue in made:
        asyncio.run(client.aclose())
        queue.close()


@pytest.mark.parametrize("fixture", SCENARIOS, ids=lambda p: p.name.split(".")[0])
def test_replay_and_the_worker_decide_and_write_alike(
    fixture: Path,
    replayed: dict[Path, list[dict[str, Any]]],
    replay_decisions: dict[str, dict[str, Any]],
    golden_tasks: dict[Path, list[dict[str, Any]]],
    worker_for: Any,
) -> None:
    fake = FakeFHIR(BASE)
    rewrites = fake.load_file(fixture)
    answered = {t["id"] for t in fake.all("Task")}  # a person's answers in the input: read, never written
    worker = worker_for(fake)
    encounters = sorted(r["id"] for r in fake.all("Encounter"))
    for encounter_id in encounters:  # one notification per encounter, as the EHR sends them
        worker.queue.enqueue(RESOURCE, "Encounter", encounter_id, "1", None, "test")
    seen: dict[str, dict[str, Any]] = {}
    while True:
        job = worker.queue.claim_next(worker.clock())
        if job is None:
            break
        for result in asyncio.run(worker.sync([job.resource_id])):
            for decision in result.decisions:
                seen[decision.encounter] = decision.to_json()
        worker.queue.complete(job.id)

    # The same decisions.
    expected = {f"Encounter/{e}": replay_decisions[f"Encounter/{e}"] for e in encounters if f"Encounter/{e}" in replay_decisions}
    assert set(seen) == set(expected)
    for key, decision in seen.items():
        assert decision == rewrite_references(expected[key], rewrites), key

    # The same Claims, each written once.
    want_claims = [_comparable(rewrite_references(c, rewrites)) for c in replayed.get(fixture.resolve(), [])]
    changed = [c for c in want_claims if c.get("extension")]
    written: dict[str, int] = {}
    for bundle in _transactions(fake):
        claim = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Claim")
        key = claim.get("id") or next(i["value"] for i in claim["identifier"] if i["system"] == DRAFT_IDENTIFIER_SYSTEM)
        written[key] = written.get(key, 0) + 1
    assert all(n == 1 for n in written.values()), f"written more than once: {written}"
    assert len(written) == len(changed)
    annotated = [c for c in fake.all("Claim") if c.get("meta", {}).get("tag")]
    assert sorted(jsonio.dumps(_comparable(c), option=orjson.OPT_SORT_KEYS) for c in annotated) == sorted(
        jsonio.dumps(c, option=orjson.OPT_SORT_KEYS) for c in want_claims
    )

    # The review Tasks the golden file holds, one per Claim under review, in its transaction.
    want_tasks = [_task_comparable(rewrite_references(t, rewrites)) for t in golden_tasks.get(fixture.resolve(), [])]
    written_tasks = [t for t in fake.all("Task") if t["id"] not in answered]
    assert sorted(map(orjson.dumps, (_task_comparable(t, fake) for t in written_tasks))) == sorted(map(orjson.dumps, want_tasks))
    assert all(fake.current("Task", i)["meta"]["versionId"] == "1" for i in answered)
    assert all(
        [e["resource"]["resourceType"] for e in bundle["entry"]] in (["Claim", "Provenance"], ["Claim", "Task", "Provenance"])
        for bundle in _transactions(fake)
    )

    # Deciding it all again writes nothing.
    before = len(_transactions(fake))
    asyncio.run(worker.sync(encounters))
    assert len(_transactions(fake)) == before


def _as_bundle(fixture: Path) -> bytes:
    """The fixture as one request body: an NDJSON export becomes a collection Bundle."""
    if fixture.suffix != ".ndjson":
        return fixture.read_bytes()
    entries = [{"resource": jsonio.loads(line)} for line in fixture.read_bytes().splitlines() if line.strip()]
    return jsonio.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries})


def test_evaluate_endpoint_decides_every_fixture_as_replay_does(
    tmp_path: Path, replayed: dict[Path, list[dict[str, Any]]], replay_decisions: dict[str, dict[str, Any]]
) -> None:
    """`POST /$evaluate` answers a collection Bundle: the annotated Claims, a Parameters with a
    `decision` (valueString: the decision JSON) per decision, an OperationOutcome per input error."""

    def exact(resources: list[dict[str, Any]]) -> list[bytes]:
        return [jsonio.dumps(r, option=orjson.OPT_SORT_KEYS) for r in resources]

    async def test(client: httpx.AsyncClient, app: Any) -> None:
        for fixture in SCENARIOS:
            r = await client.post("/$evaluate", content=_as_bundle(fixture), headers=AUTH)
            assert r.status_code == 200, fixture.name
            assert r.headers["content-type"].startswith("application/fhir+json")
            bundle = jsonio.loads(r.content)
            assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "collection")
            resources = [entry["resource"] for entry in bundle["entry"]]
            decisions = [
                jsonio.loads(p["valueString"])
                for resource in resources
                if resource["resourceType"] == "Parameters"
                for p in resource["parameter"]
                if p["name"] == "decision"
            ]
            claims = [resource for resource in resources if resource["resourceType"] == "Claim"]
            assert decisions, fixture.name
            for decision in decisions:
                assert decision == replay_decisions[decision["encounter"]], fixture.name
            # The same Claims, digit for digit (a decimal keeps its text).
            assert exact(claims) == exact(replayed.get(fixture.resolve(), [])), fixture.name

    serve(tmp_path, test)
