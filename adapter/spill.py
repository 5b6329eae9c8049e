"""Resources spilled to disk in partitions, so a replay holds one partition in memory at a time.

A routing pass appends each resource to the partition of its patient; a partition is then read
back whole and decided. A record (`record`) is two lines: a JSON header `[source, fullUrl]` and
the resource's JSON as it was read (an NDJSON line's own bytes, so no digit is re-written).
Records are appended in blocks (one input piece's records for one partition), buffered and
written in large writes: a million-encounter export spills ~10 GB through a few thousand files
without holding more than the buffer.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import orjson

__all__ = ["Spill", "bucket", "record"]

# Written out when the buffers of all partitions together pass this.
_BUFFER_BYTES = 32 << 20


def bucket(route: str, shards: int, partitions: int) -> tuple[int, int]:
    """(shard, partition) of a route key: stable across runs, processes and machines (CRC-32,
    never Python's `hash`, which differs per process), independent of each other."""
    h = zlib.crc32(route.encode())
    return h % shards, (h // shards) % partitions


def record(source: str, full_url: str | None, resource: bytes) -> bytes:
    """One resource as a partition holds it (`resource` is its JSON, with or without a line end)."""
    return orjson.dumps([source, full_url]) + b"\n" + resource.rstrip(b"\r\n") + b"\n"


class Spill:
    """`partitions` files in `directory`, appended to by `append`, read back by `read`."""

    def __init__(self, directory: Path, partitions: int) -> None:
        self.directory = directory
        self.partitions = partitions
        self._buffers: dict[int, bytearray] = {}
        self._buffered = 0
        self.sizes = [0] * partitions

    def path(self, partition: int) -> Path:
        return self.directory / f"part-{partition:05d}.spill"

    def append(self, partition: int, records: bytes) -> None:
        """Add `records` (made by `record`) at the end of `partition`."""
        buffer = self._buffers.get(partition)
        if buffer is None:
            buffer = self._buffers[partition] = bytearray()
        buffer += records
        self._buffered += len(records)
        self.sizes[partition] += len(records)
        if self._buffered >= _BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        for partition, buffer in self._buffers.items():
            with open(self.path(partition), "ab") as fh:
                fh.write(buffer)
        self._buffers.clear()
        self._buffered = 0

    def read(self, partition: int) -> Iterator[tuple[str, str | None, bytes]]:
        """Each record of a partition: (source, fullUrl, resource JSON)."""
        if not self.sizes[partition]:
            return
        lines = self.path(partition).read_bytes().split(b"\n")
        for n in range(0, len(lines) - 1, 2):
            source, full_url = orjson.loads(lines[n])
            yield source, full_url, lines[n + 1]
