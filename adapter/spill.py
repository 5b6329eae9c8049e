"""Resources spilled to disk in partitions, so a replay holds one partition in memory at a time.

A routing pass sorts each resource to the partition of its patient, and within it to a group
of patients; a partition is then read back whole, its records by group, and decided a group at
a time. A record is two lines: a header saying where the resource is, and the resource's JSON
as it was read (an NDJSON line's own bytes, so no digit is re-written). The header is
`[source, fullUrl]` in JSON (`record`), or for an NDJSON line of the piece's own file just its
line number (`line_record`): nearly every record is one, and its source, `file:line`, is then
never written, nor read back as JSON.

Each routing task writes the records of its piece of input to files of its own (a new one
each time what it holds reaches a bound), partition after partition and group after group (a
line `g<group>` before each group's records, not the group in every record's header;
`write_piece`), and says where each partition's block lies; a partition is the blocks of every
file, read in the order they were written (`Spill.read`). So the routing processes write what
they route themselves, nothing goes through the process that started them, and a partition's
records are in the order they were read whatever the number of processes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from zlib import crc32

import orjson

from .ingest import line_source

__all__ = ["Spill", "bucket", "line_record", "piece_path", "record", "write_piece"]


def bucket(route: str, shards: int, partitions: int, groups: int = 1) -> tuple[int, int, int]:
    """(shard, partition, group) of a route key: stable across runs, processes and machines
    (CRC-32, never Python's `hash`, which differs per process), independent of each other. The
    group is the part of its partition a key is decided with (see `Spill.read`)."""
    h = crc32(route.encode())
    rest = h // shards
    return h % shards, rest % partitions, (rest // partitions) % groups


def record(block: list[bytes], source: str, full_url: str | None, resource: bytes) -> None:
    """Add one resource to `block` as a partition holds it (`resource` is its JSON, with or
    without a line end). A block is a list of its lines, without their line ends (`write_piece`
    joins them): appending to a list copies no bytes, where a growing bytearray kept copying
    itself as it grew (a fifth of the routing pass, 100k encounters)."""
    block.append(orjson.dumps([source, full_url]))
    if resource.endswith(b"\n"):
        resource = resource[: -2 if resource.endswith(b"\r\n") else -1]
    block.append(resource)


def line_record(block: list[bytes], line: int, resource: bytes) -> None:
    """Add to `block` the resource of line `line` of the file of the piece the block is of
    (`resource`: the line's bytes, without its line end)."""
    block.append(b"%d" % line)
    block.append(resource)


def piece_path(directory: Path, piece: int, part: int = 0) -> Path:
    """The `part`th file the routing task of piece number `piece` writes."""
    return directory / f"piece-{piece:06d}-{part:04d}.spill"


def write_piece(path: Path, blocks: Mapping[int, list[bytes]], groups: int = 1) -> dict[int, tuple[int, int]]:
    """Write records of a routing task to the file `path`: `blocks[n]` (made by `record`)
    holds those of group `n % groups` of partition `n // groups`. Returns where each
    partition's records are: (offset, length), its groups one after the other, each preceded by
    a line `g<group>` when partitions have more than one."""
    extents: dict[int, tuple[int, int]] = {}
    held = sorted(n for n, block in blocks.items() if block)
    if not held:
        return extents
    offset = 0
    # A buffer of 1 MB, not the default 8 KB: a group's records are a few KB, and writing them
    # a system call each cost twice as long as the bytes' copy into the buffer and out.
    with open(path, "wb", buffering=1 << 20) as fh:
        for n in held:
            partition, group = divmod(n, groups)
            start = extents[partition][0] if partition in extents else offset
            if groups > 1:
                offset += fh.write(b"g%d\n" % group)
            offset += fh.write(b"\n".join(blocks[n]))
            offset += fh.write(b"\n")
            extents[partition] = (start, offset - start)
    return extents


class Spill:
    """`partitions` partitions, each the blocks the pieces `add`ed hold for it, read by `read`
    group by group."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._blocks: list[list[tuple[int, int, int]]] = [[] for _ in range(partitions)]  # (written, offset, length)
        # Each file written, with the input file its `line_record`s are lines of.
        self._written: list[tuple[Path, str]] = []
        self.sizes = [0] * partitions

    def add(self, path: Path, extents: Mapping[int, tuple[int, int]], file: str) -> None:
        """Take the blocks `write_piece` wrote to `path` (its result), read from `file`. Files
        are added in input order: a partition's records are read back in the order of its blocks."""
        written = len(self._written)
        self._written.append((path, file))
        for partition, (offset, length) in extents.items():
            self._blocks[partition].append((written, offset, length))
            self.sizes[partition] += length

    def read(self, partition: int) -> list[list[tuple[str, str | None, bytes]]]:
        """The records of a partition, (source, fullUrl, resource JSON), by group: the records of
        group 0 in the order they were read, then group 1's... (only the groups that have any).
        The partition's bytes are read block by block, a block holding whole records."""
        groups: dict[int, list[tuple[str, str | None, bytes]]] = {}
        for written, offset, length in self._blocks[partition]:
            path, file = self._written[written]
            fd = os.open(path, os.O_RDONLY)
            try:
                block = os.pread(fd, length, offset)
            finally:
                os.close(fd)
            if len(block) != length:
                raise OSError(f"{path}: cut short while the replay ran")
            found = groups.setdefault(0, [])
            # Line by line as a BytesIO gives them, found by memchr and cut with no method called
            # on the block: `index` (or `find`) took ~1,200 instructions a call to look itself up
            # and parse its arguments, twice a record, more than all the rest of reading it.
            lines = io.BytesIO(block)
            readline = lines.readline  # (bound once a block, not looked up once a record)
            try:
                for header in lines:
                    if header.startswith(b"g"):
                        found = groups.setdefault(int(header[1:]), [])
                        continue
                    resource = readline()
                    if not resource.endswith(b"\n"):
                        raise ValueError("no line end where one must be")
                    if header.startswith(b"["):
                        source, full_url = orjson.loads(header)
                        found.append((source, full_url, resource[:-1]))
                    elif (number := header[:-1].decode("ascii")).isdigit():
                        found.append((line_source(file, number), None, resource[:-1]))
                    else:
                        raise ValueError("a header that is not one")
            except ValueError:  # (a UnicodeDecodeError is one)
                raise OSError(f"{path}: changed while the replay ran") from None
        return [groups[g] for g in sorted(groups) if groups[g]]
