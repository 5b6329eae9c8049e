"""Replay throughput and memory, beside the floor of merely parsing the same bytes.

    python bench/replay.py                 # 1,000 and 10,000 encounters
    python bench/replay.py --encounters 500

Generates N realistic PHP/IOP encounters (Patient, Coverage, Practitioner, Condition,
Encounter, 1-2 OT sessions, Claim: 8-9 resources, ~9 KB each) as one Bundle file per
encounter, then runs `g0129 replay` on them in a fresh process and reports encounters/second
and the process's peak RSS. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "fixtures" / "01-medicare-php-hospital.json"


def generate(folder: Path, n: int) -> int:
    """Write n encounter bundles; return the total bytes written."""
    template = orjson.loads(TEMPLATE.read_bytes())
    raw = orjson.dumps(template)
    total = 0
    for i in range(n):
        # Re-key every id (php01-* -> b<i>-*) so encounters are distinct resources.
        data = raw.replace(b"php01-", f"b{i}-".encode())
        bundle = orjson.loads(data)
        variant = i % 4
        entries = bundle["entry"]
        if variant == 1:  # a second, short session the same day
            session = next(e for e in entries if e["resource"].get("id") == f"b{i}-ot1")
            extra = copy.deepcopy(session)
            extra["resource"]["id"] = f"b{i}-ot2"
            extra["fullUrl"] = extra["fullUrl"].replace("ot1", "ot2")
            extra["resource"]["performedPeriod"] = {"start": "2025-03-04T13:00:00-05:00", "end": "2025-03-04T13:30:00-05:00"}
            entries.append(extra)
        elif variant == 2:  # IOP
            enc = next(e for e in entries if e["resource"]["resourceType"] == "Encounter")
            enc["resource"]["serviceType"]["coding"][0]["code"] = "92"
        elif variant == 3:  # no claim yet
            bundle["entry"] = [e for e in entries if e["resource"]["resourceType"] != "Claim"]
        out = orjson.dumps(bundle)
        (folder / f"enc-{i:06d}.json").write_bytes(out)
        total += len(out)
    return total


def parse_floor(folder: Path) -> float:
    files = sorted(folder.iterdir())
    start = time.perf_counter()
    for path in files:
        orjson.loads(path.read_bytes())
    return time.perf_counter() - start


def run_replay(folder: Path, out: Path, *flags: str) -> tuple[float, int]:
    """Seconds for `g0129 replay` in a fresh process (imports excluded), and its peak RSS in KB."""
    argv = ["replay", str(folder), "--out", str(out), *flags]
    script = (
        "import resource, sys, time\n"
        "from adapter.cli import main\n"
        "t = time.perf_counter()\n"
        f"code = main({argv!r}, stdout=open('/dev/null', 'w'))\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    seconds, rss_kb = proc.stdout.split()
    return float(seconds), int(rss_kb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encounters", type=int, nargs="+", default=[1_000, 10_000])
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpu(s); one process, one core")
    print(f"{'encounters':>10} {'MB':>7} {'parse-only enc/s':>17} {'--no-validate enc/s':>20} {'replay enc/s':>13} {'peak RSS MB':>12}")
    for n in args.encounters:
        with tempfile.TemporaryDirectory() as tmp:
            folder, out = Path(tmp) / "in", Path(tmp) / "out"
            folder.mkdir()
            size = generate(folder, n)
            floor = parse_floor(folder)
            fast_s, _ = run_replay(folder, out, "--no-validate")
            replay_s, rss = run_replay(folder, out)
            decided = len((out / "decisions.ndjson").read_bytes().splitlines())
            assert decided == n, f"{decided} decisions for {n} encounters"
            print(
                f"{n:>10} {size / 1e6:>7.1f} {n / floor:>17,.0f} {n / fast_s:>20,.0f} {n / replay_s:>13,.0f} {rss / 1024:>12.0f}"
            )
    print("parse-only = read + orjson.loads of the same files (the floor); replay = read, resolve, decide, annotate,")
    print("validate every Claim with the R4B models and write the three files; --no-validate skips the validation.")


if __name__ == "__main__":
    main()
