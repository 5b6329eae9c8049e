"""Sidecar throughput and latency: notifications accepted, decisions written back, and the time between.

    python bench/service.py                      # 2,000 notifications
    python bench/service.py --notifications 500
    python bench/service.py --rate 20 --latency-notifications 300

Everything runs in one process and one event loop: the FastAPI app (`adapter.service.create_app`)
is called through `httpx.ASGITransport`, and its FHIR server is the tests' in-memory `FakeFHIR`
behind `httpx.MockTransport`, loaded with N distinct PHP/IOP encounters cloned from
fixtures/01-medicare-php-hospital.json (13 resources each, ids re-keyed). The job queue is the
real SQLite file (WAL, synchronous=FULL) in a temporary directory, so the disk under it matters:
the script prints which one and how many fsyncs per second it does.

Phase 1, throughput:
  accept   N `PUT /notify/Encounter/<id>` with the worker stopped (accept + durable enqueue);
  drain    then `worker.run_once()` until the queue is empty (read, decide, annotate, validate,
           write back), checking that the fake holds version 2 of every Claim.
Phase 2, latency: a fresh app with its worker running (lifespan entered; the catch-up tick queues
one catch-up at start-up, which is let finish first, and G0129_CATCHUP_INTERVAL=3600 keeps it
from coming back) receives notifications at a steady rate; per encounter, the time from sending
the PUT to the moment the fake applies the Claim's transaction.

Prints figures; asserts only that every Claim was written.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
# `tests` is not an installed package: the repository root must be importable for tests.fakefhir.
sys.path.insert(0, str(ROOT))

from adapter.ruleset import RuleSet, load_ruleset  # noqa: E402
from adapter.service import create_app  # noqa: E402
from adapter.settings import Settings  # noqa: E402
from tests.fakefhir import FakeFHIR  # noqa: E402

Resource = dict[str, Any]

TEMPLATE = ROOT / "fixtures" / "01-medicare-php-hospital.json"
BASE = "http://fhir.bench/fhir"
TOKEN = "bench-webhook-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Every id of encounter i starts with `bench<i>-`: the key that routes a request to its shard.
KEY = re.compile(rb"bench(\d+)-")


# -- data ----------------------------------------------------------------------------------------


def encounter_resources(template: bytes, i: int) -> list[Resource]:
    """The 13-14 resources of encounter i: the fixture with every id re-keyed (php01-* -> bench<i>-*)."""
    bundle = orjson.loads(template.replace(b"php01-", f"bench{i}-".encode()))
    resources: list[Resource] = [e["resource"] for e in bundle["entry"]]
    # A little variety, as bench/replay.py has; every variant keeps its Claim, so each
    # encounter ends in exactly one Claim write that the benchmark can wait for.
    variant = i % 3
    if variant == 1:  # a second, short session the same day (decided, not billed)
        session = next(r for r in resources if r.get("id") == f"bench{i}-ot1")
        extra = orjson.loads(orjson.dumps(session))
        extra["id"] = f"bench{i}-ot2"
        extra["performedPeriod"] = {"start": "2025-03-04T13:00:00-05:00", "end": "2025-03-04T13:30:00-05:00"}
        resources.append(extra)
    elif variant == 2:  # IOP instead of PHP
        encounter = next(r for r in resources if r["resourceType"] == "Encounter")
        encounter["serviceType"]["coding"][0]["code"] = "92"
    return resources


class ShardedFHIR:
    """One FakeFHIR per encounter behind a single httpx handler, routed by the id key.

    FakeFHIR scans every resource it stores on each search (and copies its whole store on each
    transaction), so one instance holding N encounters costs O(N) per request, and the
    benchmark would measure the fake rather than the service. A shard holds one encounter, so
    each request costs what it costs in the tests. Requests that name no encounter (the
    catch-up's `_lastUpdated` searches) go to every shard and their results are merged.

    It also timestamps, per Claim id, the moment a transaction writing that Claim is applied,
    and adds up the time spent inside the fake (to tell the service's cost from the fake's).
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.shards: dict[int, FakeFHIR] = {}
        self.claim_written: dict[str, float] = {}
        self.seconds = 0.0
        self.requests = 0

    def load(self, i: int, resources: Iterable[Resource]) -> None:
        shard = self.shards.setdefault(i, FakeFHIR(self.base))
        shard.load(*resources)

    def current(self, i: int, rtype: str, rid: str) -> Resource | None:
        return self.shards[i].current(rtype, rid)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        start = time.perf_counter()
        try:
            return self._handle(request)
        finally:
            self.requests += 1
            self.seconds += time.perf_counter() - start

    def _handle(self, request: httpx.Request) -> httpx.Response:
        match = KEY.search(request.url.raw_path) or KEY.search(request.content)
        if match is not None:
            response = self.shards[int(match.group(1))](request)
            if request.method == "POST" and b'"transaction"' in request.content and response.status_code == 200:
                self._note_claim_writes(response)
            return response
        parts = request.url.path.removeprefix("/fhir").strip("/").split("/")
        if request.method == "GET" and len(parts) == 1 and parts[0] and parts[0] != "metadata":
            entries: list[Resource] = []
            for shard in self.shards.values():
                entries.extend(orjson.loads(shard(request).content).get("entry", []))
            body = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
            return httpx.Response(200, content=orjson.dumps(body), headers={"Content-Type": "application/fhir+json"})
        return next(iter(self.shards.values()))(request)

    def _note_claim_writes(self, response: httpx.Response) -> None:
        now = time.perf_counter()
        for entry in orjson.loads(response.content).get("entry", []):
            location = str((entry.get("response") or {}).get("location") or "")
            if location.startswith("Claim/"):
                self.claim_written.setdefault(location.split("/")[1], now)


def load_fake(n: int) -> tuple[ShardedFHIR, list[bytes]]:
    """A fake holding n encounters, and the body of each encounter's rest-hook notification."""
    template = TEMPLATE.read_bytes()
    fake = ShardedFHIR(BASE)
    bodies = []
    for i in range(n):
        fake.load(i, encounter_resources(template, i))
        # The notification carries the Encounter as the server stored it (meta.versionId 1).
        bodies.append(orjson.dumps(fake.current(i, "Encounter", f"bench{i}-enc")))
    return fake, bodies


def make_settings(data_dir: Path) -> Settings:
    return Settings.from_env(
        {
            "G0129_FHIR_BASE_URL": BASE,
            "G0129_WEBHOOK_TOKEN": TOKEN,
            "G0129_DATA_DIR": str(data_dir),
            # The lifespan's catch-up tick runs once at start-up; an hour keeps it from
            # running again during the measurement.
            "G0129_CATCHUP_INTERVAL": "3600",
        }
    )


async def notify(client: httpx.AsyncClient, i: int, body: bytes) -> float:
    """Send encounter i's notification; return the seconds until the 200 came back."""
    start = time.perf_counter()
    response = await client.put(f"/notify/Encounter/bench{i}-enc", content=body, headers=AUTH)
    if response.status_code != 200:
        raise RuntimeError(f"notification {i} answered {response.status_code}: {response.text}")
    return time.perf_counter() - start


def unwritten(fake: ShardedFHIR, n: int) -> list[int]:
    return [i for i in range(n) if (fake.current(i, "Claim", f"bench{i}-claim") or {}).get("meta", {}).get("versionId") != "2"]


# -- phases --------------------------------------------------------------------------------------


@dataclass
class Throughput:
    accept_s: float
    accept_latencies: list[float]
    drain_s: float
    fake_s: float  # of drain_s, spent inside the fake FHIR server
    outcomes: dict[str, int]  # decisions by outcome, and Claim writes by result, from /metrics


async def throughput(n: int, concurrency: int, data_dir: Path, rules: RuleSet) -> Throughput:
    fake, bodies = load_fake(n)
    app = create_app(make_settings(data_dir), rules=rules, transport=httpx.MockTransport(fake), run_worker=False)
    queue, worker = app.state.queue, app.state.worker
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://adapter") as client:
            # `concurrency` senders in parallel, as HAPI's delivery threads (5 by default) would.
            todo = iter(range(n))
            latencies: list[float] = []

            async def sender() -> None:
                for i in todo:
                    latencies.append(await notify(client, i, bodies[i]))

            start = time.perf_counter()
            await asyncio.gather(*(sender() for _ in range(concurrency)))
            accept_s = time.perf_counter() - start
        pending = queue.counts()["pending"]
        if pending != n:
            raise RuntimeError(f"{pending} jobs queued for {n} notifications")

        fake.seconds = 0.0
        start = time.perf_counter()
        while await worker.run_once():
            pass
        drain_s = time.perf_counter() - start
        outcomes = counted(app.state.metrics.registry, "g0129_decisions_total", "outcome", ("bill", "review", "do-not-bill"))
        outcomes |= counted(app.state.metrics.registry, "g0129_writebacks_total", "result", ("updated", "created", "unchanged", "conflict"))
    missing = unwritten(fake, n)
    if missing:
        raise RuntimeError(f"{len(missing)} Claims not at version 2, e.g. encounter {missing[0]}")
    return Throughput(accept_s, latencies, drain_s, fake.seconds, outcomes)


def counted(registry: Any, name: str, label: str, values: Iterable[str]) -> dict[str, int]:
    """The non-zero samples of a labelled Prometheus counter."""
    samples = {value: int(registry.get_sample_value(name, {label: value}) or 0) for value in values}
    return {value: count for value, count in samples.items() if count}


@dataclass
class Latency:
    sent: int
    rate: float
    send_s: float
    accept_latencies: list[float]
    end_to_end: list[float]


async def latency(m: int, rate: float, data_dir: Path, rules: RuleSet, timeout: float) -> Latency:
    fake, bodies = load_fake(m)
    app = create_app(make_settings(data_dir), rules=rules, transport=httpx.MockTransport(fake), run_worker=True)
    sent: dict[str, float] = {}
    accept_latencies: list[float] = []
    async with app.router.lifespan_context(app):
        # The lifespan's catch-up tick queues a catch-up run at once. Against the sharded fake it
        # fans out to every shard (a real server answers it with one indexed search), so let it
        # finish before the clock starts rather than charge it to the first notifications.
        queue = app.state.queue
        while queue.counts()["done"] < 1 or queue.counts()["pending"]:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://adapter") as client:

            async def send(i: int) -> None:
                sent[f"bench{i}-claim"] = time.perf_counter()
                accept_latencies.append(await notify(client, i, bodies[i]))

            # Open loop: each notification leaves on its own schedule, whether or not earlier
            # ones were answered, so a slow accept shows as latency, not as a lower rate.
            tasks = []
            start = time.perf_counter()
            for i in range(m):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(i)))
            await asyncio.gather(*tasks)
            send_s = time.perf_counter() - start
            deadline = time.perf_counter() + timeout
            while (len(fake.claim_written) < m or queue.counts()["pending"]) and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
    missing = unwritten(fake, m)
    if missing:
        raise RuntimeError(f"{len(missing)} Claims not at version 2 after {timeout:.0f} s, e.g. encounter {missing[0]}")
    return Latency(m, rate, send_s, accept_latencies, [fake.claim_written[c] - t for c, t in sent.items()])


# -- machine -------------------------------------------------------------------------------------


def disk_of(path: Path) -> str:
    """The device and file system holding `path` (the longest mount point above it)."""
    real = str(path.resolve())
    best = ("?", "?", "")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, point, fstype = line.split()[:3]
                if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best[2]):
                    best = (device, fstype, point)
    except OSError:
        return "unknown"
    return f"{best[0]} ({best[1]}, mounted on {best[2]})"


def fsyncs_per_second(folder: Path, count: int = 200) -> float:
    """Raw write+fsync rate of the disk under `folder`: the ceiling of one-fsync-per-commit."""
    path = folder / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, b"x" * 512)
            os.fsync(fd)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


# -- main ----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    rules = load_ruleset()
    with tempfile.TemporaryDirectory(prefix="g0129-bench-") as tmp:
        folder = Path(tmp)
        # Other work on the machine shows directly in the figures, hence the load average.
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"python {platform.python_version()}, {os.cpu_count()} cpu(s) ({cpu_model()}), load average {load}; one process, one event loop")
        print(f"queue disk: {disk_of(folder)}, {fsyncs_per_second(folder):,.0f} write+fsync/s")
        n = args.notifications
        t = await throughput(n, args.concurrency, folder / "throughput", rules)
        e2e_rate = n / t.drain_s
        # A moderate load by default: half of what the worker just sustained, so the queue
        # stays short and the latency is the pipeline's, not a backlog's.
        rate = args.rate or max(1.0, round(e2e_rate / 2))
        m = args.latency_notifications or min(n, max(50, int(rate * 15)))
        lat = await latency(m, rate, folder / "latency", rules, timeout=max(60.0, 4 * m / e2e_rate))

    rows = [
        ("notifications accepted/s", f"{n / t.accept_s:,.0f}", f"{n} PUT /notify/Encounter/<id>, {args.concurrency} senders, worker stopped"),
        ("  accept latency p50 / p99", f"{percentile(t.accept_latencies, .5) * 1e3:.1f} / {percentile(t.accept_latencies, .99) * 1e3:.1f} ms", "per PUT, same run"),
        ("end-to-end decisions/s", f"{e2e_rate:,.0f}", f"then worker.run_once() until the {n} jobs are done (all {n} Claims at version 2)"),
        ("  of which in the fake FHIR", f"{t.fake_s / t.drain_s:.0%}", f"{t.fake_s / n * 1e3:.1f} ms per job inside FakeFHIR"),
        ("notification -> write-back p50", f"{percentile(lat.end_to_end, .5) * 1e3:.0f} ms", f"{lat.sent} notifications at {lat.rate:g}/s with the worker running"),
        ("notification -> write-back p99", f"{percentile(lat.end_to_end, .99) * 1e3:.0f} ms", f"min {min(lat.end_to_end) * 1e3:.0f} ms, max {max(lat.end_to_end) * 1e3:.0f} ms"),
        ("  accept latency p50 / p99", f"{percentile(lat.accept_latencies, .5) * 1e3:.1f} / {percentile(lat.accept_latencies, .99) * 1e3:.1f} ms", "per PUT while the worker runs in the same event loop"),
    ]
    print(f"phase 1 outcomes: {', '.join(f'{k} {v}' for k, v in t.outcomes.items())}")
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>{value_width}}  setup")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{value_width}}  {note}")
    print("accepted/s = auth, parse, SQLite insert with one fsync per enqueue, 200 reply (no FHIR calls);")
    print("decisions/s = claim a job, 2 FHIR reads (search with includes + batch), decide, annotate, validate")
    print("  the R4 Claim, one transaction (Claim PUT + Provenance), record our own write, mark done;")
    print("notification -> write-back = from sending the PUT to the fake applying the Claim's transaction,")
    print("  the worker being woken by the accepted notification (its idle poll is only a fallback).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notifications", type=int, default=2_000, help="phase 1: notifications (distinct encounters)")
    parser.add_argument("--concurrency", type=int, default=5, help="phase 1: parallel senders (HAPI delivers with 5 threads)")
    parser.add_argument("--rate", type=float, default=0.0, help="phase 2: notifications per second (default: half the phase-1 decisions/s)")
    parser.add_argument("--latency-notifications", type=int, default=0, help="phase 2: how many (default: about 15 s worth)")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
