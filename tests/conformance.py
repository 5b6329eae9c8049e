"""The published definitions are made from the code and the rule tables, never kept by hand.

    python3 -m tests.conformance      # rewrite adapter/conformance/ (conformance/ points there)

`tests/test_conformance.py` requires the committed files to be exactly what this renders.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from adapter.definitions import definitions
from adapter.ruleset import load_ruleset

DIRECTORY = Path(__file__).resolve().parent.parent / "adapter" / "conformance"


def render() -> dict[str, bytes]:
    """File name -> the bytes committed (pretty JSON, one trailing newline)."""
    return {name: orjson.dumps(resource, option=orjson.OPT_INDENT_2) + b"\n" for name, resource in definitions(load_ruleset()).items()}


def main() -> None:
    DIRECTORY.mkdir(exist_ok=True)
    files = render()
    for stale in DIRECTORY.glob("*.json"):
        if stale.name not in files:
            stale.unlink()
    for name, data in files.items():
        (DIRECTORY / name).write_bytes(data)


if __name__ == "__main__":
    main()
