"""Chaos: `g0129 serve` beside HAPI, killed with SIGKILL while a burst of PHP days comes in.

    python3 bench/chaos.py                          # 200 encounters, 5 kills
    python3 bench/chaos.py --encounters 500 --kills 10 --seed 7

Everything stays on 127.0.0.1. The script
  1. starts HAPI (`scripts/fhir-server up`) unless it already answers on --fhir-base;
  2. runs a real `g0129 serve` (its own temporary G0129_DATA_DIR, catch-up every 10 s, JSON logs
     into one file across restarts) and `g0129 subscribe`, as tests/test_e2e_hapi.py does;
  3. loads N PHP days into HAPI, fixture 01 under fresh ids, one transaction each, a few at a
     time; meanwhile it kills the service with SIGKILL K times at random moments of the burst
     (each at a random fraction of the load, plus up to a second) and restarts it at once;
  4. waits for the queue to drain (every Claim annotated and nothing pending, or nothing pending
     for two catch-up rounds, or --drain-timeout) and prints:
       accepted     notifications the service answered 2xx (its access log, every process)
       processed    encounters whose Claim HAPI holds annotated
       lost         encounters whose Claim was never annotated
       duplicates   Claims with more than one Provenance or a version above 2
     beside what the logs and the queue say (write-backs, conflicts, retries, dead letters, jobs
     by source).

It prints figures and asserts nothing. It is bounded: at most 2,000 encounters, 50 kills and a
30-minute drain. It leaves HAPI running (with the loaded data: HAPI keeps it in memory) and
deletes the Subscriptions at the end, as the e2e tests do: it shares their fixed ids, so do not
run it while the e2e tests run against the same HAPI.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapter.vocabulary import TAG_SYSTEM  # noqa: E402

TEMPLATE = ROOT / "fixtures" / "01-medicare-php-hospital.json"
MAX_ENCOUNTERS, MAX_KILLS, MAX_DRAIN = 2_000, 50, 1_800.0
CATCHUP_INTERVAL = 10.0
LOCAL_HOSTS = ("127.0.0.1",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- HAPI ----------------------------------------------------------------------------------------


def hapi_up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/metadata", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def ensure_hapi(base: str) -> str:
    if hapi_up(base):
        return "already up"
    port = str(urlsplit(base).port or 8080)
    print(f"chaos: HAPI is not up at {base}; scripts/fhir-server up ...", flush=True)
    subprocess.run([str(ROOT / "scripts" / "fhir-server"), "up"], check=True, env={**os.environ, "FHIR_SERVER_PORT": port}, timeout=900)
    return "started by scripts/fhir-server up"


def php_day(base: str) -> tuple[str, bytes]:
    """Fixture 01 under fresh ids, as a transaction Bundle of PUTs (as the e2e tests' php_day)."""
    prefix = f"c{uuid.uuid4().hex[:10]}"
    bundle = orjson.loads(TEMPLATE.read_bytes().replace(b"php01-", f"{prefix}-".encode()))
    entries = [
        {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in (e["resource"] for e in bundle["entry"])
    ]
    return prefix, orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def annotated(claim: dict[str, Any]) -> bool:
    return any(t.get("system") == TAG_SYSTEM and t.get("code") == "annotated" for t in (claim.get("meta") or {}).get("tag", []))


# -- the service -------------------------------------------------------------------------------


@dataclass
class Service:
    """`g0129 serve` in a process of its own; every incarnation appends to the same log."""

    fhir_base: str
    data_dir: Path
    log: Path
    token: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    down_seconds: float = 0.0
    # More G0129_* settings (bench/service.py: the database, the log level).
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "G0129_FHIR_BASE_URL": self.fhir_base,
            "G0129_WEBHOOK_TOKEN": self.token,
            "G0129_DATA_DIR": str(self.data_dir),
            "G0129_CATCHUP_INTERVAL": str(CATCHUP_INTERVAL),
            "G0129_LOG_FORMAT": "json",
            "G0129_LOG_LEVEL": "info",
            **self.extra,
        }

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "adapter.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env(), cwd=ROOT, stdout=sink, stderr=sink,
            )
        self.starts += 1
        deadline = time.monotonic() + 60
        while not self.alive():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"g0129 serve did not start; see {self.log}")
            time.sleep(0.1)

    def alive(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None
            self.kills += 1

    def stop(self) -> None:
        """At the end: SIGTERM (uvicorn shuts down cleanly), SIGKILL if it lingers."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
            self.proc = None

    def pending(self) -> float | None:
        try:
            for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
                if line.startswith("g0129_queue_pending "):
                    return float(line.split()[1])
        except httpx.TransportError:
            return None
        return None

    def g0129(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "adapter.cli", *args], env=self.env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Load:
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    prefixes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def load(fhir: httpx.Client, base: str, n: int, concurrency: int, state: Load) -> None:
    days = [php_day(base) for _ in range(n)]
    state.prefixes = [prefix for prefix, _ in days]

    def post(body: bytes) -> None:
        try:
            ok = fhir.post("", content=body).status_code == 200
        except httpx.TransportError:
            ok = False
        with state.lock:
            state.sent += 1
            state.failed += not ok

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, (body for _, body in days)))
    state.seconds = time.monotonic() - start


def killer(service: Service, kills: int, n: int, state: Load, rng: random.Random, abort: threading.Event) -> None:
    """SIGKILL at K random points of the burst (a fraction of the encounters sent, then up to a
    second more), each followed by an immediate restart. A kill whose point the load passed
    while the previous restart was under way comes as soon as that restart is done."""
    points = sorted(rng.uniform(0.02, 0.98) for _ in range(kills))
    for point in points:
        while state.sent < point * n and not abort.is_set():
            time.sleep(0.02)
        if abort.wait(rng.uniform(0.0, 1.0)):
            return
        down = time.monotonic()
        service.kill9()
        try:
            service.start()
        except RuntimeError as exc:
            print(f"chaos: {exc}", file=sys.stderr, flush=True)
            return
        service.down_seconds += time.monotonic() - down


def scan(fhir: httpx.Client, prefixes: list[str], seen: set[str]) -> None:
    """Add to `seen` every prefix whose Claim HAPI holds annotated."""

    def check(prefix: str) -> str | None:
        try:
            r = fhir.get(f"/Claim/{prefix}-claim")
        except httpx.TransportError:
            return None
        return prefix if r.status_code == 200 and annotated(r.json()) else None

    with ThreadPoolExecutor(8) as pool:
        seen.update(p for p in pool.map(check, [p for p in prefixes if p not in seen]) if p)


def drain(fhir: httpx.Client, service: Service, prefixes: list[str], timeout: float) -> tuple[set[str], float, float | None]:
    """Wait until every Claim is annotated and nothing is pending, or nothing has been pending
    for two catch-up rounds, or `timeout`. Returns the annotated prefixes, the seconds waited,
    and the seconds until the last Claim was seen annotated (None if some never were)."""
    start = time.monotonic()
    seen: set[str] = set()
    idle_since: float | None = None
    complete: float | None = None
    while time.monotonic() - start < timeout:
        scan(fhir, prefixes, seen)
        if complete is None and len(seen) == len(prefixes):
            complete = time.monotonic() - start
        pending = service.pending()
        if pending == 0:
            idle_since = idle_since or time.monotonic()
            if len(seen) == len(prefixes) or time.monotonic() - idle_since > 2 * CATCHUP_INTERVAL + 5:
                break
        else:
            idle_since = None
        time.sleep(2)
    return seen, time.monotonic() - start, complete


def duplicates(fhir: httpx.Client, prefixes: list[str]) -> list[tuple[str, str, int]]:
    """(prefix, version, Provenances) of every Claim written more than once."""

    def check(prefix: str) -> tuple[str, str, int]:
        claim = fhir.get(f"/Claim/{prefix}-claim").json()
        total = fhir.get("/Provenance", params={"target": f"Claim/{prefix}-claim", "_summary": "count"}).json().get("total", 0)
        return prefix, str((claim.get("meta") or {}).get("versionId")), int(total)

    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(check, prefixes))
    return [(p, v, t) for p, v, t in rows if t > 1 or (v.isdigit() and int(v) > 2)]


def read_log(path: Path) -> tuple[Counter[str], int]:
    """Counts by kind from the service's JSON log (every incarnation); and lines that are no
    JSON (a line cut short by SIGKILL)."""
    counts: Counter[str] = Counter()
    broken = 0
    for raw in path.read_bytes().splitlines():
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            broken += 1
            continue
        event = line.get("event")
        if line.get("logger") == "uvicorn.access" and str(line.get("path", "")).startswith("/notify"):
            status = int(line.get("status") or 0)
            counts["notify 2xx" if 200 <= status < 300 else f"notify {status}"] += 1
        elif event in ("write-back", "decision"):
            counts[f"{event} {line.get('outcome')}"] += 1
        elif event:
            counts[event] += 1
    return counts, broken


def queue_jobs(service: Service) -> Counter[str]:
    """Jobs in the durable queue by state and source (`g0129 queue list`)."""
    jobs: Counter[str] = Counter()
    for state in ("done", "pending", "dead"):
        out = service.g0129("queue", "list", "--state", state)
        for line in out.stdout.splitlines():
            job = orjson.loads(line)
            source = "rest-hook" if str(job["source"]).startswith("rest-hook") else str(job["source"]).split(" ")[0]
            jobs[f"{state} {job['kind']} ({source})"] += 1
    return jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encounters", type=int, default=200, help=f"PHP days loaded (at most {MAX_ENCOUNTERS:,}; default 200)")
    parser.add_argument("--kills", type=int, default=5, help=f"SIGKILLs of the service during the burst (at most {MAX_KILLS}; default 5)")
    parser.add_argument("--concurrency", type=int, default=4, help="transactions posted to HAPI at once (default 4)")
    parser.add_argument("--drain-timeout", type=float, default=420.0, help="seconds to wait for the queue to drain (default 420)")
    parser.add_argument("--fhir-base", default="http://127.0.0.1:8080/fhir", help="HAPI's base URL, on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and the service's log")
    args = parser.parse_args()
    if not 1 <= args.encounters <= MAX_ENCOUNTERS or not 0 <= args.kills <= MAX_KILLS or not 0 < args.drain_timeout <= MAX_DRAIN:
        parser.error(f"--encounters 1..{MAX_ENCOUNTERS}, --kills 0..{MAX_KILLS}, --drain-timeout up to {MAX_DRAIN:.0f} s")
    base = args.fhir_base.rstrip("/")
    if urlsplit(base).hostname not in LOCAL_HOSTS:
        parser.error("--fhir-base must be on 127.0.0.1: this script kills and loads things")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    rng = random.Random(seed)

    hapi = ensure_hapi(base)
    work = Path(tempfile.mkdtemp(prefix="g0129-chaos-"))
    service = Service(base, work / "data", work / "serve.log", secrets.token_hex(16))
    fhir = httpx.Client(base_url=base, timeout=60, headers={"Content-Type": "application/fhir+json"})
    print(f"chaos: HAPI {base} ({hapi}); {args.encounters} encounters, {args.kills} kills, seed {seed}; work dir {work}", flush=True)
    state, abort = Load(), threading.Event()
    kill_thread = threading.Thread(target=killer, args=(service, args.kills, args.encounters, state, rng, abort), daemon=True)
    try:
        service.start()
        subscribed = service.g0129("subscribe", "--endpoint", f"{service.url}/notify", "--fhir-base", base, "--wait", "60")
        if subscribed.returncode != 0:
            print(subscribed.stdout + subscribed.stderr, file=sys.stderr)
            return 1
        started = time.monotonic()
        kill_thread.start()
        load(fhir, base, args.encounters, args.concurrency, state)
        kill_thread.join(120 + 60 * args.kills)
        print(f"chaos: loaded in {state.seconds:.1f} s, {service.kills} kill(s); draining ...", flush=True)
        seen, waited, complete = drain(fhir, service, state.prefixes, args.drain_timeout)
        total = time.monotonic() - started
        dups = duplicates(fhir, state.prefixes)
        service.stop()
        counts, broken = read_log(service.log)
        jobs = queue_jobs(service)
    finally:
        abort.set()  # no restart behind our back
        if kill_thread.is_alive():
            kill_thread.join(120)
        service.stop()
        for rtype in ("encounter", "procedure", "claim", "task"):
            try:
                fhir.delete(f"/Subscription/g0129-{rtype}")
            except httpx.TransportError:
                pass
        fhir.close()

    lost = [p for p in state.prefixes if p not in seen]
    n = args.encounters
    print()
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"g0129 chaos ({commit or 'not a git checkout'}): {n} encounters (PHP days) into HAPI, {service.kills} SIGKILL(s) of g0129 serve, {service.starts} start(s)")
    print(f"  load           {state.seconds:.1f} s ({n / state.seconds:.1f} transactions/s, {state.failed} refused by HAPI)")
    print(f"  service down   {service.down_seconds:.1f} s in all (kill, restart, until /healthz answers)")
    print(f"  drain          {waited:.1f} s after the load until nothing was pending; {total:.1f} s from the first transaction")
    print("  all annotated  " + (f"{complete:.1f} s after the load" if complete is not None else "never"))
    print(f"  accepted       {counts['notify 2xx']} notifications answered 2xx"
          + "".join(f", {counts[k]} {k.removeprefix('notify ')}" for k in sorted(counts) if k.startswith("notify ") and k != "notify 2xx"))
    print(f"  processed      {len(seen)} of {n} encounters: their Claim is annotated on HAPI")
    print(f"  lost           {len(lost)}" + (f" (e.g. {', '.join(lost[:5])})" if lost else ""))
    print(f"  duplicates     {len(dups)} Claims with more than one Provenance or a version above 2"
          + (f" (e.g. {', '.join(f'{p}: v{v}, {t} Provenance' for p, v, t in dups[:5])})" if dups else ""))
    print("  the service's log (every process):")
    print("    write-backs  " + ", ".join(f"{k.split(' ', 1)[1]} {v}" for k, v in sorted(counts.items()) if k.startswith("write-back ")))
    print("    decisions    " + ", ".join(f"{k.split(' ', 1)[1]} {v}" for k, v in sorted(counts.items()) if k.startswith("decision ")))
    print(f"    conflicts {counts['conflict']}, retries {counts['retry']}, dead letters {counts['dead-letter']}, "
          f"catch-ups that found work {counts['catch-up']}, lines cut short by a kill {broken}")
    print("  the queue:      " + ", ".join(f"{k} {v}" for k, v in sorted(jobs.items())))
    if args.keep:
        print(f"  kept: {work} (serve.log, data/queue.sqlite3)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
