"""Golden annotated Claims: `NN-name.expected.json` beside each scenario (fixtures/, fixtures-invalid/).

Each holds a `collection` Bundle of the annotated Claims the replay writes for that fixture, so
the fixture test compares whole outputs (a per-field assert misses what it does not name).
A scenario with a Claim under review has `NN-name.expected.task.json` too: the review Tasks
(adapter/review.py) written beside its Claims, as made for a first write at `TASK_TIME` for the
owner `TASK_OWNER` (tests/test_review.py).
They are made by the code and then read by a person: regenerate after a deliberate change with

    python3 -m tests.golden

and review `git diff fixtures/` before committing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from adapter import jsonio
from adapter.ingest import load_paths
from adapter.pipeline import AnnotatedClaim, evaluate
from adapter.review import review_task, task_key
from adapter.ruleset import load_ruleset

ROOT = Path(__file__).resolve().parent.parent
SCENARIO_DIRS = (ROOT / "fixtures", ROOT / "fixtures-invalid")


TASK_TIME = "2026-01-01T00:00:00+00:00"
TASK_OWNER = "Organization/billing-team"


def golden_path(fixture: Path) -> Path:
    return fixture.with_name(fixture.name.split(".")[0] + ".expected.json")


def task_path(fixture: Path) -> Path:
    return fixture.with_name(fixture.name.split(".")[0] + ".expected.task.json")


def _annotated_by_fixture() -> dict[Path, list[AnnotatedClaim]]:
    index, _, _ = load_paths(list(SCENARIO_DIRS))
    result = evaluate(index, load_ruleset())
    out: dict[Path, list[AnnotatedClaim]] = {}
    for claim in result.claims:
        path, _, line = claim.source.rpartition(":")  # an NDJSON source is path:line
        out.setdefault(Path(path if line.isdigit() else claim.source).resolve(), []).append(claim)
    return out


def claims_by_fixture() -> dict[Path, list[dict[str, Any]]]:
    """The annotated Claims of a replay of the whole folder, by the fixture each came from."""
    return {path: [c.resource for c in claims] for path, claims in _annotated_by_fixture().items()}


def tasks_by_fixture() -> dict[Path, list[dict[str, Any]]]:
    """The review Tasks a first write of each fixture's Claims makes, by fixture (none: absent)."""
    out: dict[Path, list[dict[str, Any]]] = {}
    for path, claims in _annotated_by_fixture().items():
        tasks = [
            review_task(task_key(c.key, c.resource), c.key, c.resource, c.decisions, c.cases, False, None, TASK_OWNER, TASK_TIME) for c in claims
        ]
        if made := [t for t in tasks if t is not None]:
            out[path] = made
    return out


def as_bundle(claims: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": c} for c in claims]}


def main() -> None:
    for fixture, claims in sorted(claims_by_fixture().items()):
        golden_path(fixture).write_bytes(jsonio.dumps(as_bundle(claims), option=orjson.OPT_INDENT_2) + b"\n")
        print(f"wrote {golden_path(fixture).relative_to(ROOT)}")
    for stale in (p for d in SCENARIO_DIRS for p in d.glob("*.expected.task.json")):
        stale.unlink()
    for fixture, tasks in sorted(tasks_by_fixture().items()):
        task_path(fixture).write_bytes(jsonio.dumps(as_bundle(tasks), option=orjson.OPT_INDENT_2) + b"\n")
        print(f"wrote {task_path(fixture).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
