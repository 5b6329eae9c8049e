"""Golden annotated Claims: `NN-name.expected.json` beside each scenario (fixtures/, fixtures-invalid/).

Each holds a `collection` Bundle of the annotated Claims the replay writes for that fixture, so
the fixture test compares whole outputs (a per-field assert misses what it does not name).
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
from adapter.pipeline import evaluate
from adapter.ruleset import load_ruleset

ROOT = Path(__file__).resolve().parent.parent
SCENARIO_DIRS = (ROOT / "fixtures", ROOT / "fixtures-invalid")


def golden_path(fixture: Path) -> Path:
    return fixture.with_name(fixture.name.split(".")[0] + ".expected.json")


def claims_by_fixture() -> dict[Path, list[dict[str, Any]]]:
    """The annotated Claims of a replay of the whole folder, by the fixture each came from."""
    index, _, _ = load_paths(list(SCENARIO_DIRS))
    result = evaluate(index, load_ruleset())
    out: dict[Path, list[dict[str, Any]]] = {}
    for claim in result.claims:
        path, _, line = claim.source.rpartition(":")  # an NDJSON source is path:line
        out.setdefault(Path(path if line.isdigit() else claim.source).resolve(), []).append(claim.resource)
    return out


def as_bundle(claims: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": c} for c in claims]}


def main() -> None:
    for fixture, claims in sorted(claims_by_fixture().items()):
        golden_path(fixture).write_bytes(jsonio.dumps(as_bundle(claims), option=orjson.OPT_INDENT_2) + b"\n")
        print(f"wrote {golden_path(fixture).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
