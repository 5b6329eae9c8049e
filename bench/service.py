"""Sidecar throughput over real HTTP: notifications accepted, decisions written back, SQLite
against PostgreSQL, one replica against three.

    python3 bench/service.py                                   # the whole matrix, in-memory FHIR
    python3 bench/service.py --fhir memory,hapi                # and against HAPI (scripts/fhir-server up)
    python3 bench/service.py --databases postgresql --replicas 3 --encounters 1000

PostgreSQL: --database-url, else G0129_TEST_DATABASE_URL, else `scripts/postgres url` (start it
with `scripts/postgres up`); each run gets a fresh schema of its own, dropped afterwards. SQLite:
a fresh file in a temporary directory (WAL, synchronous=FULL).

Everything runs on this machine, client included, as separate processes talking over sockets:

intake   `uvicorn --workers W` serving the sidecar without its worker (bench.service:intake_app;
         the access log off), and a raw HTTP/1.1 client with C keep-alive connections sending
         N `PUT /notify/Encounter/<id>` as fast as they are answered. Prints accepted/s and the
         p50/p99 of each PUT (send to 200). Every accepted notification is durable before its
         200 (group commit: one transaction for the requests that arrive together).
e2e      R `g0129 serve` processes (replicas, G0129_WORKER_CONCURRENCY jobs in flight each) on
         one database, G0129_LOG_LEVEL=warning, and a FHIR server holding E PHP days (fixture 01
         under fresh ids): `memory` is tests/fakefhir.py's FakeFHIR served by uvicorn in a
         process of its own (one shard per encounter, as before), `hapi` is G0129_E2E_FHIR_BASE
         (default http://127.0.0.1:8080/fhir). The client sends one notification per encounter,
         spread over the replicas as a load balancer would, and waits until every Claim is
         annotated. Prints decisions/s (encounters decided and written back per second, from the
         first notification to the last write) and the accept p50/p99 while the workers run.

Before the clock starts, the catch-up checkpoint is set to now, so the replicas' catch-up at
start does not queue the data loaded for the run. Prints figures; raises if a Claim is not
written or a notification is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
# `tests` and `bench` are not installed packages: the repository root must be importable.
sys.path.insert(0, str(ROOT))

from adapter.queue import JobQueue  # noqa: E402
from adapter.settings import Settings  # noqa: E402
from bench.chaos import Service, annotated, free_port  # noqa: E402
from tests.fakefhir import FakeFHIR  # noqa: E402

Resource = dict[str, Any]

TEMPLATE = ROOT / "fixtures" / "01-medicare-php-hospital.json"
TOKEN = "bench-webhook-token"
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


def load_fake(n: int, base: str) -> ShardedFHIR:
    """A fake holding n encounters."""
    template = TEMPLATE.read_bytes()
    fake = ShardedFHIR(base)
    for i in range(n):
        fake.load(i, encounter_resources(template, i))
    return fake


# -- the processes ---------------------------------------------------------------------------------


def intake_app() -> Any:
    """uvicorn factory: the sidecar without its worker, settings from the environment."""
    from adapter.service import create_app

    return create_app(Settings.from_env(), run_worker=False)


def fake_fhir_app() -> Any:
    """uvicorn factory: BENCH_ENCOUNTERS encounters in a ShardedFHIR at BENCH_FHIR_BASE, over
    HTTP; GET /_written answers how many Claims have been written."""
    fake = load_fake(int(os.environ["BENCH_ENCOUNTERS"]), os.environ["BENCH_FHIR_BASE"])
    origin = os.environ["BENCH_FHIR_BASE"].removesuffix("/fhir")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        if scope["path"] == "/_written":
            response = httpx.Response(200, content=orjson.dumps(len(fake.claim_written)))
        else:
            query = scope["query_string"].decode()
            request = httpx.Request(
                scope["method"], origin + scope["raw_path"].decode() + (f"?{query}" if query else ""),
                headers=[(k.decode(), v.decode()) for k, v in scope["headers"]], content=body,
            )
            response = fake(request)
        headers = [(k.encode(), v.encode()) for k, v in response.headers.items() if k.lower() != "content-length"]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": response.content})

    return app


@contextmanager
def uvicorn(factory: str, env: dict[str, str], workers: int = 1, port: int = 0) -> Iterator[str]:
    """`uvicorn --factory` in processes of their own on `port` (default: a free one); yields
    its URL."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", factory, "--workers", str(workers), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{url}/_written" if "fake" in factory else f"{url}/healthz"), 120, f"{factory} did not start")
        if workers > 1:
            time.sleep(3.0)  # every worker process listening, not only the first
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_until(ok: Any, timeout: float, message: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(every)


@contextmanager
def database(kind: str, url: str, folder: Path) -> Iterator[str]:
    """A fresh, empty database of `kind`: an SQLite file, or a schema of its own in `url`."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'queue-{uuid.uuid4().hex[:8]}.sqlite3'}"
        return
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(f"DROP SCHEMA {schema} CASCADE")


# -- the client ----------------------------------------------------------------------------------


def put(path: str, body: bytes) -> bytes:
    """One HTTP/1.1 request, keep-alive, as bytes on the wire."""
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: adapter\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/fhir+json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def send_all(urls: list[str], requests: list[bytes], connections: int) -> tuple[float, list[float]]:
    """Send every request over `connections` keep-alive connections spread over `urls`, each
    connection sending its next request when the last is answered; returns the seconds it
    took and each request's latency. A client this small costs little CPU next to the server."""
    todo = iter(requests)
    latencies: list[float] = []

    async def connection(url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for request in todo:
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                body = await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"refused: {head.splitlines()[0].decode()} {body[:300].decode()}")
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection(urls[k % len(urls)]) for k in range(connections)))
    return time.perf_counter() - start, latencies


# -- the runs ------------------------------------------------------------------------------------


@dataclass
class Row:
    run: str
    database: str
    setup: str
    count: int
    rate: float
    latencies: list[float]
    note: str = ""


def adapter_env(database_url: str, fhir_base: str, folder: Path) -> dict[str, str]:
    return {
        "G0129_FHIR_BASE_URL": fhir_base,
        "G0129_WEBHOOK_TOKEN": TOKEN,
        "G0129_DATA_DIR": str(folder),
        "G0129_DATABASE_URL": database_url,
        # The catch-up at start only; an hour keeps it from running during the measurement.
        "G0129_CATCHUP_INTERVAL": "3600",
        "G0129_LOG_LEVEL": "warning",
    }


def intake(kind: str, url: str, folder: Path, n: int, workers: int, connections: int) -> Row:
    with database(kind, url, folder) as database_url:
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        requests = [
            put(f"/notify/Encounter/in{i}", orjson.dumps({"resourceType": "Encounter", "id": f"in{i}", "status": "finished", "meta": {"versionId": "1", "lastUpdated": stamp}}))
            for i in range(n)
        ]
        with uvicorn("bench.service:intake_app", adapter_env(database_url, "http://127.0.0.1:9/fhir", folder), workers) as service:
            seconds, latencies = asyncio.run(send_all([service], requests, connections))
        with JobQueue(database_url) as queue:
            pending = queue.counts()["pending"]
    if pending < n:
        raise RuntimeError(f"{pending} jobs stored for {n} accepted notifications")
    return Row("intake", kind, f"{workers} uvicorn worker(s), {connections} connections", n, n / seconds, latencies)


def end_to_end(kind: str, url: str, folder: Path, fhir: str, n: int, replicas: int, connections: int) -> Row:
    with database(kind, url, folder) as database_url:
        if fhir == "memory":
            port = free_port()
            base = f"http://127.0.0.1:{port}/fhir"
            context = fake_fhir(base, n, port)
        else:
            base = fhir
            context = hapi(base, n)
        with context as (ids, written):
            with JobQueue(database_url) as queue:
                # The catch-up at start looks from now: the data just loaded is not its work.
                queue.set_checkpoint("lastUpdated", datetime.now(timezone.utc).isoformat())
                services = [
                    Service(base, folder, folder / f"serve-{kind}-{r}.log", TOKEN, extra=adapter_env(database_url, base, folder))
                    for r in range(replicas)
                ]
                try:
                    for service in services:
                        service.start()
                    wait_until(lambda: queue.counts()["pending"] == 0 and queue.counts()["done"] >= 1, 120, "the catch-up at start did not finish")
                    requests = [put(f"/notify/Encounter/{e}", body) for e, body in ids]
                    start = time.perf_counter()
                    _, latencies = asyncio.run(send_all([s.url for s in services], requests, connections))
                    # Asking HAPI is work for HAPI: twice a second at most (the figure's resolution).
                    wait_until(lambda: written() >= n, max(300.0, n / 2), f"{n - written()} Claims not written", every=0.5 if fhir != "memory" else 0.1)
                    seconds = time.perf_counter() - start
                    counts = queue.counts()
                finally:
                    for service in services:
                        service.stop()
    note = f"jobs done {counts['done']}, dead {counts['dead']}"
    return Row(f"e2e {fhir}", kind, f"{replicas} replica(s)", n, n / seconds, latencies, note)


@contextmanager
def fake_fhir(base: str, n: int, port: int) -> Iterator[tuple[list[tuple[str, bytes]], Any]]:
    """The in-memory FHIR server in its own process; yields the notifications to send and a
    function counting the Claims written."""
    env = {"BENCH_ENCOUNTERS": str(n), "BENCH_FHIR_BASE": base}
    with uvicorn("bench.service:fake_fhir_app", env, port=port) as url:
        template = TEMPLATE.read_bytes()
        bodies = []
        for i in range(n):
            encounter = next(r for r in encounter_resources(template, i) if r["resourceType"] == "Encounter")
            bodies.append((f"bench{i}-enc", orjson.dumps(encounter)))
        yield bodies, lambda: int(httpx.get(f"{url}/_written", timeout=10).json())


@contextmanager
def hapi(base: str, n: int) -> Iterator[tuple[list[tuple[str, bytes]], Any]]:
    """n PHP days loaded into HAPI (fixture 01 under fresh ids, a transaction each)."""
    if not answers(f"{base}/metadata"):
        raise RuntimeError(f"no FHIR server at {base} (scripts/fhir-server up)")
    template = TEMPLATE.read_bytes()
    run = uuid.uuid4().hex[:6]
    bodies = []
    claims = []
    with httpx.Client(base_url=base, timeout=60, headers={"Content-Type": "application/fhir+json"}) as fhir:
        for i in range(n):
            resources = orjson.loads(template.replace(b"php01-", f"h{run}x{i}-".encode()))["entry"]
            entries = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                       for r in (e["resource"] for e in resources)]
            fhir.post("", content=orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})).raise_for_status()
            encounter = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "Encounter")
            bodies.append((encounter["id"], orjson.dumps(encounter)))
            claims.append(f"h{run}x{i}-claim")

        done: set[str] = set()

        def written() -> int:
            for k in range(0, len(claims), 50):
                chunk = [c for c in claims[k : k + 50] if c not in done]
                if chunk:
                    found = fhir.get("Claim", params={"_id": ",".join(chunk), "_count": "50"}).json().get("entry", [])
                    done.update(e["resource"]["id"] for e in found if annotated(e["resource"]))
            return len(done)

        yield bodies, written


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


def postgres_url(given: str) -> str:
    if given:
        return given
    if os.environ.get("G0129_TEST_DATABASE_URL"):
        return os.environ["G0129_TEST_DATABASE_URL"]
    return subprocess.run([str(ROOT / "scripts" / "postgres"), "url"], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--databases", default="sqlite,postgresql", help="sqlite, postgresql or both (default)")
    parser.add_argument("--database-url", default="", help="the PostgreSQL (default: G0129_TEST_DATABASE_URL, else scripts/postgres url)")
    parser.add_argument("--notifications", type=int, default=5_000, help="intake: notifications sent (default 5,000)")
    parser.add_argument("--workers", type=int, default=2, help="intake: uvicorn worker processes (default 2, one per core)")
    parser.add_argument("--connections", type=int, default=32, help="client keep-alive connections (default 32)")
    parser.add_argument("--fhir", default="memory", help="e2e FHIR servers: memory, hapi or both (memory,hapi); none skips e2e")
    parser.add_argument("--fhir-base", default=os.environ.get("G0129_E2E_FHIR_BASE", "http://127.0.0.1:8080/fhir"), help="HAPI's base URL")
    parser.add_argument("--encounters", type=int, default=600, help="e2e: encounters, one notification each (default 600; HAPI: a fifth)")
    parser.add_argument("--replicas", default="1,3", help="e2e: replica counts (default 1,3)")
    args = parser.parse_args()
    kinds = args.databases.split(",")
    url = postgres_url(args.database_url) if "postgresql" in kinds else ""
    fhirs = [] if args.fhir == "none" else args.fhir.split(",")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="g0129-bench-") as tmp:
        folder = Path(tmp)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"python {platform.python_version()}, {os.cpu_count()} cpu(s) ({cpu_model()}), load average {load}")
        print(f"SQLite disk: {disk_of(folder)}, {fsyncs_per_second(folder):,.0f} write+fsync/s", flush=True)
        for kind in kinds:
            rows.append(intake(kind, url, folder, args.notifications, args.workers, args.connections))
            report(rows[-1:])
        for fhir in fhirs:
            n = args.encounters if fhir == "memory" else max(20, args.encounters // 5)
            for kind in kinds:
                for replicas in (int(r) for r in args.replicas.split(",")):
                    rows.append(end_to_end(kind, url, folder, "memory" if fhir == "memory" else args.fhir_base, n, replicas, min(args.connections, 8)))
                    report(rows[-1:])
    print()
    report(rows)


def report(rows: list[Row]) -> None:
    for row in rows:
        print(
            f"{row.run:<10} {row.database:<10} {row.setup:<34} {row.count:>6}  {row.rate:>8,.0f}/s"
            f"  p50 {percentile(row.latencies, .5) * 1e3:6.1f} ms  p99 {percentile(row.latencies, .99) * 1e3:6.1f} ms  {row.note}",
            flush=True,
        )


if __name__ == "__main__":
    main()
