"""End to end with replicas: three `g0129 serve` processes on one PostgreSQL beside a real HAPI
FHIR server, a burst of notifications for 50 encounters spread over them as a load balancer
would, and one replica killed with SIGKILL in the middle of its work.

Needs HAPI (tests/test_e2e_hapi.py says how) and PostgreSQL (G0129_TEST_DATABASE_URL, from
`scripts/postgres up`); `.ci/run` starts both. The test sends the notifications itself (HAPI's
Subscriptions name one endpoint, and the load balancer in front of the replicas is what spreads
them): for each encounter its Encounter, its OT session and its Claim, each as HAPI stored it,
so several replicas want each patient's Claim at once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from adapter.queue import JobQueue

from .test_e2e_hapi import HAPI, Adapter, annotated, php_day, wait_for
from .test_e2e_hapi import pytestmark as hapi_marks

pytestmark = hapi_marks

ENCOUNTERS = 50
REPLICAS = 3


@pytest.fixture
def hapi() -> Iterator[httpx.Client]:
    with httpx.Client(base_url=HAPI, timeout=60, headers={"Content-Type": "application/fhir+json"}) as client:
        yield client


@pytest.fixture
def replicas(tmp_path: Path, postgres_url: str) -> Iterator[list[Adapter]]:
    adapters = []
    for n in range(REPLICAS):
        (tmp_path / f"replica{n}").mkdir()
        adapter = Adapter(tmp_path / f"replica{n}" / "data", HAPI)
        adapter.env["G0129_DATABASE_URL"] = postgres_url
        adapters.append(adapter)
    yield adapters
    for adapter in adapters:
        adapter.stop()


def load(hapi: httpx.Client, n: int) -> tuple[list[str], list[dict[str, Any]]]:
    """n PHP days in HAPI; their prefixes, and the resources to notify, as HAPI stored them."""
    prefixes, changed = [], []
    for _ in range(n):
        prefix, bundle = php_day()
        response = hapi.post("", content=orjson.dumps(bundle), headers={"Prefer": "return=representation"})
        assert response.status_code == 200, response.text
        stored = {e["resource"]["id"]: e["resource"] for e in response.json()["entry"]}
        prefixes.append(prefix)
        changed += [stored[f"{prefix}-{name}"] for name in ("enc", "ot1", "claim")]
    return prefixes, changed


def test_three_replicas_one_killed_annotate_every_claim_once(hapi: httpx.Client, replicas: list[Adapter], postgres_url: str) -> None:
    prefixes, changed = load(hapi, ENCOUNTERS)
    with JobQueue(postgres_url) as queue:
        # The catch-up at start looks from now on: the notifications are the work here.
        queue.set_checkpoint("lastUpdated", time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()))
        for adapter in replicas:
            adapter.start()
        victim = replicas[0]
        assert victim.proc is not None
        owner = f"{victim.proc.pid}-"
        alive = list(replicas)

        def deliver(k: int) -> int:
            """One notification, to the next replica; a dead one is skipped, as a load
            balancer's health check would."""
            resource = changed[k]
            for attempt in range(len(replicas)):
                adapter = alive[(k + attempt) % len(alive)]
                try:
                    return adapter.notify(resource).status_code
                except httpx.TransportError:
                    continue
            return 0

        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(deliver, range(len(changed) // 2)))
            # Kill the victim while it holds leases: jobs it took and did not finish.
            held = wait_for(
                "the victim to hold a lease",
                lambda: [job.id for job in queue.list("pending") if (job.leased_by or "").startswith(owner)],
                timeout=60, every=0.05,
            )
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            victim.proc = None
            alive.remove(victim)
            rest = list(pool.map(deliver, range(len(changed) // 2, len(changed))))
        assert first + rest == [200] * len(changed), "every notification accepted"

        def claims() -> list[dict[str, Any]]:
            ids = ",".join(f"{prefix}-claim" for prefix in prefixes)
            bundle = hapi.get("/Claim", params={"_id": ids, "_count": str(ENCOUNTERS)}).json()
            return [entry["resource"] for entry in bundle.get("entry", [])]

        wait_for("every Claim annotated", lambda: sum(annotated(c) for c in claims()) == ENCOUNTERS, timeout=240, every=1)
        wait_for("the queue to drain", lambda: queue.counts()["pending"] == 0, timeout=120, every=0.5)

        assert {c["meta"]["versionId"] for c in claims()} == {"2"}, "each Claim written once"
        for prefix in prefixes:
            found = hapi.get("/Provenance", params={"target": f"Claim/{prefix}-claim", "_summary": "count"}).json()
            assert found["total"] == 1, f"Claim/{prefix}-claim: one Provenance"
        counts = queue.counts()
        assert counts["dead"] == 0
        assert counts["done"] >= len(changed)
        # The victim's unfinished jobs were taken over and finished by the others.
        assert {queue.get(job).state for job in held} == {"done"}
        assert all(not (queue.get(job).leased_by or "").startswith(owner) for job in held)
