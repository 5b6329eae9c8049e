from __future__ import annotations

import re
import subprocess
import sys

import pytest

# Partitions decided one after another, each a heap of small objects let go at its end; then
# CPython's own count of the arenas it gave back to the OS (`sys._debugmallocstats`, on stderr),
# counted from just before the first.
_PARTITIONS = """
import os, sys
from adapter import heap
if sys.argv[1] == "keep":
    heap.keep(24 << 20)
def reclaimed():
    os.write(2, b"@@\\n")
    sys._debugmallocstats()
reclaimed()
for _ in range(4):
    partition = [{"id": str(n), "reference": f"Patient/{n}"} for n in range(40_000)]  # ~16 MB
    del partition
reclaimed()
"""


def _arenas_reclaimed(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PARTITIONS, mode], capture_output=True, text=True, check=True)
    before, after = (int(m) for m in re.findall(r"# arenas reclaimed\s*=\s*(\d+)", done.stderr))
    return after - before


@pytest.mark.skipif(not hasattr(sys, "_debugmallocstats"), reason="CPython's allocator statistics")
def test_kept_arenas_are_not_given_back_between_partitions() -> None:
    # Without keep, each partition's arenas go back to the OS at its end (and are mapped again,
    # page by page, by the next one): what keep is for.
    assert _arenas_reclaimed("none") >= 4 * 8
    assert _arenas_reclaimed("keep") == 0


def test_keep_takes_only_what_it_does_not_hold_yet() -> None:
    from adapter import heap

    heap.keep(1 << 20)
    held = len(heap._kept)
    heap.keep(1 << 20)
    heap.keep(1 << 19)
    assert len(heap._kept) == held
