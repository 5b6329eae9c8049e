"""Replay throughput and memory on a Bulk Data export, beside the naive path and the floor.

    python bench/replay.py                          # ratios at 10k and 100k; memory at 10k, 100k, 1M
    python bench/replay.py --sizes 10000 100000     # memory and time per encounter at these sizes
    python bench/replay.py --ratio-size 2000 --sizes 2000
    python bench/replay.py --python /opt/venv/bin/python   # the adapter installed there

The replays run the adapter that `--python` (default: this interpreter) imports, from outside
the source tree: an install from a wheel (`pip install .`, the image) runs the modules compiled
by mypyc, an editable install the same code as pure Python. The first lines say which, the
processor, and the versions of the libraries the naive path (this interpreter's) and the replay
(`--python`'s) run on: the ratios move with each.

Generates N realistic PHP/IOP encounters as a FHIR Bulk Data export: one NDJSON file per
resource type (Patient, Coverage, Condition, EpisodeOfCare, Encounter, Procedure, Goal,
Communication, Claim, and the shared Organizations and Practitioners of a 20-hospital system
with 200 therapists), ~10 resources and ~6 KB per encounter; a quarter of the days have a
second short session, a quarter are IOP, a quarter have no Claim yet. Nothing is committed:
the files are made on the fly in a temporary directory (~6 GB at 1M encounters, plus as much
again for the replay's partitions).

On the same bytes, at each `--ratio-size` (encounters; 10k and 100k unless told), it times:
  - floor:  `orjson.loads` of each line (read before);
  - naive:  each line validated by its fhir.resources R4B model (`model_validate_json`), in
            this process, its models imported and built before (by a one-encounter warm-up);
  - replay: `g0129 replay --workers 1` (the default validation: what we add is validated), and
            `--workers N` (N = the CPUs available), each the whole command: Python's start,
            the imports, the rule tables and the Claim models built, then the work. Beside
            the first, its throughput with that start-up taken out, measured as the naive
            path's is: the CPU of the replay less that of a one-encounter replay of the same
            system (its shared resources too), for the encounters after the first (a figure to
            read from thousands of encounters on, where the work dwarfs a start-up's noise);
  - N independent `replay --workers 1` started together: what N processes get from this
            machine's cores, the ceiling for `--workers N`;
in `--repeat` rounds (5 unless told) of one run each, and prints encounters/s and the ratios:
the median of the rounds' and their range. A round's figures are taken together, as this
machine's speed drifts, and not the same for every measure: the naive path's most. So that a
round's naive path and replay are minutes apart at most, the floor and the naive path read a
slice of the lines a round, the rounds' slices together being every line once (every
`repeat`th line of each file: each slice holds every type in the export's proportions), and
the naive path and the one-worker replay run back to back, in turns (first the one, next round
the other). Last, the naive path's rate over every line (its slices' time summed) and the
one-worker replay's median rate over it. What runs on one core
(the floor, the naive path, the one-worker replays) runs pinned to the same one, so the
scheduler moving a process between cores adds nothing to the noise (`--no-pin`: not pinned).
At each of `--sizes` it runs `g0129 replay --workers 1` and prints its wall and CPU time per
encounter and its peak RSS, then `--workers N`'s wall time, peak RSS and speed over one worker (from 100k on, the start-up of ~0.4 s that both take weighs nothing).
At 10k the start-up weighs ~12% of a one-worker replay, at 100k ~1%: the ratios at 100k are
the throughput's. Every replay is checked to have decided every encounter. Prints figures;
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "fixtures" / "01-medicare-php-hospital.json"
HOSPITALS, THERAPISTS = 20, 200


def _template() -> dict[str, dict[str, Any]]:
    bundle = orjson.loads(TEMPLATE.read_bytes())
    return {e["resource"]["id"]: e["resource"] for e in bundle["entry"]}


def _shared(template: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The system's hospitals, the payer and its therapists: shared by every patient."""
    for h in range(HOSPITALS):
        yield {**template["php01-hosp"], "id": f"hosp-{h}"}
    yield {**template["php01-cms"], "id": "payer-cms"}
    for t in range(THERAPISTS):
        yield {**template["php01-ot"], "id": f"ot-{t}"}


def _encounter(template: dict[str, dict[str, Any]], i: int) -> list[dict[str, Any]]:
    """The resources of encounter i: its patient's compartment, re-keyed, pointing at the pools."""
    raw = orjson.dumps([r for key, r in template.items() if key not in ("php01-hosp", "php01-cms", "php01-ot")])
    raw = (
        raw.replace(b"Organization/php01-hosp", f"Organization/hosp-{i % HOSPITALS}".encode())
        .replace(b"Organization/php01-cms", b"Organization/payer-cms")
        .replace(b'Practitioner/php01-ot"', f'Practitioner/ot-{i % THERAPISTS}"'.encode())
        .replace(b"php01-", f"b{i}-".encode())
    )
    resources: list[dict[str, Any]] = orjson.loads(raw)
    variant = i % 4
    if variant == 1:  # a second, short session the same day
        session = next(r for r in resources if r.get("id") == f"b{i}-ot1")
        extra = copy.deepcopy(session)
        extra["id"] = f"b{i}-ot2"
        extra["performedPeriod"] = {"start": "2025-03-04T13:00:00-05:00", "end": "2025-03-04T13:30:00-05:00"}
        resources.append(extra)
    elif variant == 2:  # IOP
        enc = next(r for r in resources if r["resourceType"] == "Encounter")
        enc["serviceType"]["coding"][0]["code"] = "92"
    elif variant == 3:  # no claim yet
        resources = [r for r in resources if r["resourceType"] != "Claim"]
    return resources


def generate(folder: Path, n: int) -> int:
    """Write an n-encounter export into `folder`, one NDJSON file per type; return its bytes."""
    template = _template()
    with ExitStack() as stack:
        files: dict[str, IO[bytes]] = {}

        def write(res: dict[str, Any]) -> None:
            rtype = res["resourceType"]
            if rtype not in files:
                files[rtype] = stack.enter_context(open(folder / f"{rtype}.ndjson", "wb", buffering=1 << 20))
            files[rtype].write(orjson.dumps(res) + b"\n")

        for res in _shared(template):
            write(res)
        for i in range(n):
            for res in _encounter(template, i):
                write(res)
    return sum(p.stat().st_size for p in folder.iterdir())


@contextmanager
def _on(cpus: set[int]) -> Iterator[None]:
    """Run what is measured inside on `cpus` (the processes it starts too)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _lines(folder: Path, part: int = 0, parts: int = 1) -> Iterator[bytes]:
    """Every line of the export, or its `part`th slice of `parts`: every `parts`th line of each
    file from the `part`th, so a slice holds every type in the export's proportions and the
    slices together hold every line once."""
    for path in sorted(folder.glob("*.ndjson")):
        with open(path, "rb") as fh:
            yield from itertools.islice(fh, part, None, parts)


def floor(lines: list[bytes]) -> float:
    """CPU s of `orjson.loads` on each of `lines`."""
    start = time.process_time()
    for line in lines:
        orjson.loads(line)
    return time.process_time() - start


def naive(lines: list[bytes]) -> float:
    """CPU s of each of `lines` through its R4B model."""
    from fhir.resources.R4B import get_fhir_model_class

    models: dict[str, Any] = {}
    start = time.process_time()
    for line in lines:
        rtype = orjson.loads(line)["resourceType"]  # which model: the type is in the line
        model = models.get(rtype) or models.setdefault(rtype, get_fhir_model_class(rtype))
        model.model_validate_json(line)
    return time.process_time() - start


def build_of(python: str) -> str:
    """Which adapter `python` runs: where it is, and whether its hot modules are compiled. Its
    modules are compiled to bytecode once, as installing does (pip at install, the image at
    build): with PYTHONDONTWRITEBYTECODE set, as on our CI machines, every replay started from a
    source checkout would compile ~10k lines again (~0.2 s here)."""
    probe = "import adapter, adapter.case as c; print(adapter.__path__[0]); print(c.__file__)"
    package, case = subprocess.run([python, "-c", probe], cwd="/", check=True, capture_output=True, text=True).stdout.split()
    subprocess.run([python, "-m", "compileall", "-q", package], check=True)
    return f"{'compiled by mypyc' if not case.endswith('.py') else 'pure Python'} ({package})"


# The libraries each side's speed rests on: the naive path's (pydantic-core's compiled validators,
# in this interpreter) and the replay's (in `--python`'s).
NAIVE_LIBRARIES = ("fhir.resources", "pydantic-core")
REPLAY_LIBRARIES = ("msgspec", "orjson", "fhir.resources", "pydantic-core")


# Prints `name version` for each distribution named in argv, or `name not installed`.
_VERSIONS = """
import sys, importlib.metadata as m
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "not installed"
print(", ".join(f"{name} {version(name)}" for name in sys.argv[1:]))
"""


def versions(python: str, names: Sequence[str]) -> str:
    """`name version, ...` of the distributions `names` as `python` has them installed."""
    return subprocess.run([python, "-c", _VERSIONS, *names], cwd="/", check=True, capture_output=True, text=True).stdout.strip()


# Prints the interpreter's version, its executable, and where its libpython is: linked into the
# executable, or loaded as a shared library.
_INTERPRETER = """
import os, sys
try:
    with open("/proc/self/maps") as fh:
        shared = sorted({line.split()[-1] for line in fh if "libpython" in line})
    where = f"{os.path.basename(shared[0])}, a shared library" if shared else "libpython linked in"
except OSError:
    where = "libpython: not known here"
print(f"{sys.version.split()[0]} {os.path.realpath(sys.executable)} ({where})")
"""


def interpreter(python: str) -> str:
    """Which CPython `python` is, and how its libpython is linked. The replay spends its time in
    the interpreter's dicts and allocator, the naive path in pydantic-core's validators and the
    models' Python ones: how the interpreter was built (profile-guided or not, libpython shared
    or linked in) moves the two unalike, so a ratio compares with another run's only on the
    same interpreter."""
    return subprocess.run([python, "-c", _INTERPRETER], cwd="/", check=True, capture_output=True, text=True).stdout.strip()


def processor() -> str:
    """The processor: the ratios depend on it (the naive path's compiled validators and the
    replay's interpreter do not gain alike from one processor to another). Its model name, and
    its family and model numbers, which tell generations apart where a virtual machine gives
    only a brand ("AMD EPYC")."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if not name.strip():
                    break  # the first processor's fields only
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine() or "unknown"
    numbers = ", ".join(f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields)
    return f"{fields['model name']} ({numbers})" if numbers else fields["model name"]


# Starts a replay and prints its wall s, exit code, CPU s (its workers' included: wait4 counts
# the descendants it waited for) and peak RSS KB. A process of its own, and a small one, since
# Linux gives a child the peak RSS of the process it was forked from, kept across exec: started
# from this one, which holds a slice of the export's lines, a replay would show this one's.
_LAUNCH = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.execv(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)  # not started: the code no replay exits with
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
"""


def replay(python: str, folder: Path, out: Path, *flags: str) -> tuple[float, float, int]:
    """`g0129 replay` in a fresh process: (wall s, CPU s of it and its workers, peak RSS KB of
    the largest process). Checks every encounter was decided."""
    argv = [python, "-m", "adapter.cli", "replay", str(folder), "--out", str(out), "--no-progress", *flags]
    # (The replay's stderr, and the launcher's, go to this one's: a failed replay says why.)
    report = subprocess.run([sys.executable, "-c", _LAUNCH, *argv], cwd=folder.parent, check=True, stdout=subprocess.PIPE, text=True)
    wall, code, cpu, rss = report.stdout.split()
    if int(code) not in (0, 1):
        raise SystemExit(f"replay failed: exit {code}")
    return float(wall), float(cpu), int(rss)


def side_by_side(python: str, folder: Path, tmp: Path, k: int) -> float:
    """Wall seconds for k independent `replay --workers 1` of the same input started together:
    what k processes get from this machine's cores (shared caches, memory, a host's other
    tenants), so the ceiling of `--workers k`."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [python, "-m", "adapter.cli", "replay", str(folder), "--out", str(tmp / f"side-{i}"), "--no-progress", "--workers", "1"],
            cwd=tmp, stdout=subprocess.DEVNULL,
        )
        for i in range(k)
    ]
    if any(proc.wait() not in (0, 1) for proc in procs):
        raise SystemExit("a side-by-side replay failed")
    return time.perf_counter() - start


def decided(out: Path) -> int:
    with open(out / "decisions.ndjson", "rb") as fh:
        return sum(1 for _ in fh)


_NAIVE_CPU = "naive CPU s"


def _baseline(folder: Path, part: int, parts: int, per_line: float, core: set[int]) -> dict[str, float]:
    """The floor's and the naive path's rates on one slice of the lines (`per_line`: encounters
    a line), and the naive path's CPU seconds (`_NAIVE_CPU`)."""
    # Read before either is timed: reading the file to pick one line in `parts` would weigh
    # `parts` times what it weighs for the replay, which reads each line once.
    lines = list(_lines(folder, part, parts))
    with _on(core):
        floor_cpu = floor(lines)
        naive_cpu = naive(lines)
    return {
        "floor (orjson.loads)": per_line * len(lines) / floor_cpu,
        "naive (R4B model_validate_json)": per_line * len(lines) / naive_cpu,
        _NAIVE_CPU: naive_cpu,
    }


def _one_worker(python: str, tmp: Path, n: int, core: set[int]) -> dict[str, float]:
    """`replay --workers 1`'s rates on the export in `tmp`, whole and less its start-up."""
    with _on(core):
        wall, cpu, _ = replay(python, tmp / "export", tmp / "out", "--workers", "1")
        assert decided(tmp / "out") == n, f"{decided(tmp / 'out')} decisions for {n} encounters"
        _, start_up, _ = replay(python, tmp / "single", tmp / "out-single", "--workers", "1")
        assert decided(tmp / "out-single") == 1
    # (Within the noise of a start-up, ~0.05 s, at a few hundred encounters: no figure.)
    work = cpu - start_up
    return {
        "replay --workers 1 (CPU)": n / cpu,
        "replay --workers 1 (CPU less start-up)": (n - 1) / work if work > 0 else math.nan,
        "replay --workers 1 (wall)": n / wall,
    }


def ratios(args: argparse.Namespace, n: int, core: set[int], every: set[int]) -> None:
    """The rates and ratios at n encounters, round by round (see the module's docstring)."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "export"
        folder.mkdir()
        size = generate(folder, n)
        single = Path(tmp) / "single"
        single.mkdir()
        generate(single, 1)
        naive(list(_lines(single)))  # the models the naive path uses, imported and built once, before any round
        total = sum(1 for _ in _lines(folder))
        print(f"\n{n:,} encounters, {size / 1e6:,.0f} MB of NDJSON, the same bytes for each:")
        # Round by round, every measure once, the naive path on one slice of the lines and
        # beside the one-worker replay (see the module's docstring): the naive path over every
        # line takes ~8x a replay's time, and measured whole each round it would leave minutes
        # between the two figures of a ratio, over which this machine's speed moves.
        rounds: list[dict[str, float]] = []
        naive_cpu = 0.0
        for part in range(args.repeat):
            rates: dict[str, float] = {}
            baseline = functools.partial(_baseline, folder, part, args.repeat, n / total, core)
            one_worker = functools.partial(_one_worker, args.python, Path(tmp), n, core)
            for measure in (baseline, one_worker) if part % 2 == 0 else (one_worker, baseline):
                rates.update(measure())
            naive_cpu += rates.pop(_NAIVE_CPU)
            out = Path(tmp) / "out"
            with _on(every):
                wall, cpu, _ = replay(args.python, folder, out, "--workers", str(args.workers))
            assert decided(out) == n, f"{decided(out)} decisions for {n} encounters"
            rates[f"replay --workers {args.workers} (CPU)"] = n / cpu
            rates[f"replay --workers {args.workers} (wall)"] = n / wall
            rates[f"{args.workers} one-worker replays at once (wall)"] = args.workers * n / side_by_side(args.python, folder, Path(tmp), args.workers)
            rounds.append(rates)
        print(f"  (the median of {args.repeat} rounds: each rate's, and each ratio's within a round, then the rounds' range)")
        for label in rounds[0]:
            if any(math.isnan(r[label]) for r in rounds):
                print(f"  {label:<40} {'n/a':>9}        (the work is within a start-up's noise at this size)")
                continue
            rate = statistics.median(r[label] for r in rounds)
            by_round = [r[label] / r["naive (R4B model_validate_json)"] for r in rounds]
            print(f"  {label:<40} {rate:>9,.0f} enc/s  {statistics.median(by_round):>6.2f}x naive  ({min(by_round):.2f}-{max(by_round):.2f})")
        one, many = "replay --workers 1 (wall)", f"replay --workers {args.workers} (wall)"
        side = f"{args.workers} one-worker replays at once (wall)"
        print(
            f"  scaling over one worker's wall rate: --workers {args.workers} {statistics.median(r[many] / r[one] for r in rounds):.2f}x; "
            f"{args.workers} independent replays side by side {statistics.median(r[side] / r[one] for r in rounds):.2f}x "
            "(what this machine's cores give N processes: the ceiling)"
        )
        if args.repeat > 1:
            whole = n / naive_cpu
            replayed = statistics.median(r["replay --workers 1 (CPU)"] for r in rounds)
            print(
                f"  the naive path over every line (the {args.repeat} rounds' slices together): {whole:,.0f} enc/s; "
                f"the one-worker replay's median rate over it: {replayed / whole:.2f}x"
            )


def count(text: str) -> int:
    """A number of rounds: 1 or more."""
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least 1 round")
    return number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio-size", type=int, nargs="+", default=[10_000, 100_000], help="encounters for the ratios, at each size (0: none)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000], help="encounters for memory and time")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="N for the N-worker run")
    parser.add_argument("--repeat", type=count, default=5, help="rounds of every measure for the ratios (their medians and range are printed; the floor and the naive path read 1/repeat of the lines a round)")
    parser.add_argument("--tmp", type=Path, default=None, help="where the export and outputs go (default: the system's temp)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose adapter the replays run (default: this one)")
    parser.add_argument("--no-pin", action="store_true", help="run the one-core measures on any core")
    args = parser.parse_args()
    every = os.sched_getaffinity(0)
    core = every if args.no_pin else {min(every)}
    print(f"python {sys.version.split()[0]}, {len(os.sched_getaffinity(0))} cpu(s) available; CPU seconds unless said")
    print(f"processor: {processor()}")
    print(f"adapter: {build_of(args.python)}")
    print(f"interpreters: the naive path's {interpreter(sys.executable)}; the replay's {interpreter(args.python)}")
    print(f"libraries: the naive path {versions(sys.executable, NAIVE_LIBRARIES)}; the replay {versions(args.python, REPLAY_LIBRARIES)}")
    for n in args.ratio_size:
        if n:
            ratios(args, n, core, every)
    if args.sizes:
        many = f"--workers {args.workers}"
        print(
            f"\n{'encounters':>10} {'MB':>7} {'wall s':>8} {'CPU ms/enc':>11} {'wall ms/enc':>12} {'peak RSS MB':>12}   (replay --workers 1)"
            f"   {'wall s':>8} {'peak RSS MB':>12} {'scaling':>8}   (replay {many})"
        )
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            folder, out = Path(tmp) / "export", Path(tmp) / "out"
            folder.mkdir()
            size = generate(folder, n)
            figures = {}
            for workers in (1, args.workers):
                with _on(core if workers == 1 else every):
                    figures[workers] = replay(args.python, folder, out, "--workers", str(workers))
                assert decided(out) == n, f"{decided(out)} decisions for {n} encounters"
            (wall, cpu, rss), (wall_n, _, rss_n) = figures[1], figures[args.workers]
            print(
                f"{n:>10,} {size / 1e6:>7,.0f} {wall:>8.1f} {cpu / n * 1e3:>11.3f} {wall / n * 1e3:>12.3f} {rss / 1024:>12.0f}"
                f"   {wall_n:>8.1f} {rss_n / 1024:>12.0f} {wall / wall_n:>7.2f}x"
            )


if __name__ == "__main__":
    main()
