"""Partitions on disk: what goes in comes back byte for byte, in order, wherever it was buffered."""

from __future__ import annotations

from pathlib import Path

import adapter.spill
from adapter.spill import Spill, bucket, record


def test_records_come_back_as_written_in_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(adapter.spill, "_BUFFER_BYTES", 200)  # several flushes on the way
    spill = Spill(tmp_path, 3)
    written: dict[int, list[tuple[str, str | None, bytes]]] = {0: [], 1: [], 2: []}
    for n in range(40):
        resource = b'{"resourceType":"Claim","id":"c%d","total":{"value":125.00}}' % n
        full_url = f"https://ehr.example.org/fhir/Claim/c{n}" if n % 2 else None
        spill.append(n % 3, record(f"claims.ndjson:{n}", full_url, resource + b"\r\n"))
        written[n % 3].append((f"claims.ndjson:{n}", full_url, resource))
    spill.flush()
    for partition in range(3):
        assert list(spill.read(partition)) == written[partition]


def test_an_empty_partition_reads_as_nothing(tmp_path: Path) -> None:
    assert list(Spill(tmp_path, 2).read(1)) == []


def test_buckets_are_stable_across_processes_and_machines() -> None:
    # A keyed hash, never Python's per-process `hash`: shard 2 of 4 is the same patients on
    # every machine of a fan-out.
    assert bucket("Patient/p1", 1, 1) == (0, 0)
    shards = {bucket(f"Patient/{n}", 4, 8)[0] for n in range(200)}
    assert shards == {0, 1, 2, 3}
    assert bucket("Patient/p1", 4, 16) == (2, 6)  # pinned: it must never change between releases
