"""Replay at any size: route every resource to its patient's partition on disk, then decide the
partitions one by one (or in parallel processes), writing results as each is decided.

Memory holds the resources many patients share (Organizations, Practitioners, Locations: a
health system's few thousand) and one partition, whatever the size of the input; a partition is
a few MB of input, held as its bytes and parsed a group of its patients at a time. The
partitions, their groups and their order depend on the input only (never on the number of
workers), so the output is the same bytes with one worker or many. `--shard I/N` keeps the
patients of one hash shard: N machines each run one shard of the same input.

Each group goes through the one decision step, `pipeline.evaluate`, with an index holding its
own resources over the shared ones.
"""

from __future__ import annotations

import functools
import gc
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

from . import jsonio
from .compartment import SHARED, Unrouted, line_route, patient_key, route, routing_view
from .errors import InputError, InvalidJSON
from .fhir_models import load_claim_models
from .ingest import (
    DEFAULT_MAX_FILE_BYTES,
    NDJSON_SUFFIXES,
    Entry,
    Index,
    Span,
    Value,
    check_resource,
    line_source,
    load_value,
    ndjson_spans,
    read_file,
)
from .pipeline import RunResult, Validation, evaluate
from .review import review_csv
from .ruleset import RuleSet
from .sinks import error_record
from .spill import Spill, bucket, line_record, piece_path, record, write_piece

__all__ = ["Part", "Piece", "Plan", "Routed", "Shard", "decide", "part_of", "plan", "route_piece", "run", "workers_default"]

# A partition's share of the input: its resources, parsed, take ~10x this in memory.
PARTITION_BYTES = 4 << 20
MAX_PARTITIONS = 4096
# A group's share of the input: a partition is decided a group of its patients at a time, so
# that what a decision reads stays in the processor's caches (see `decide`). 32 KB: paired at
# 100k encounters on a busy 2-core Zen 3, 0.89x the CPU of 64 KB; 16 KB took 1.06x of 32 KB.
GROUP_BYTES = 32 << 10
# What one routing task reads, at least: large enough that a task's overhead is nothing, small
# enough that a small export's files keep every worker busy. A big export is cut into at most
# about MAX_PIECES pieces of at most MAX_PIECE_BYTES. One worker has no other to keep busy: it
# routes each file whole, with no first pass over it to cut it at line ends (~6% of the
# routing pass at 100k encounters: counting the lines, and the kernel's copy).
PIECE_BYTES = 1 << 20
MAX_PIECES = 256
MAX_PIECE_BYTES = 32 << 20
# What a routing task holds before it writes it to a file (a new file each time), and every
# partition is then read from.
SPILL_FILE_BYTES = 32 << 20

_T = TypeVar("_T")
_R = TypeVar("_R")
_K = TypeVar("_K")


# Shard and Piece go to the routing processes by pickle, which mypyc's frozen dataclasses do not
# survive: one is a dataclass that is never assigned to, the other a tuple.
@dataclass(slots=True, unsafe_hash=True)
class Shard:
    """`--shard I/N`: the patients whose hash falls in shard `index` of `count`."""

    index: int = 0
    count: int = 1


@dataclass
class Plan:
    """The routing pass's result: the shared resources, the spilled partitions, input errors."""

    shared: Index
    spill: Spill
    errors: list[InputError]
    files: int
    encounters: int  # Encounter resources routed to this shard (for a progress display)


@dataclass
class Part:
    """One partition decided: its output lines, ready to write, and its counts."""

    decisions: bytes = b""
    claims: bytes = b""
    review: bytes = b""  # rows of review.csv
    errors: list[InputError] = field(default_factory=list)
    resources: int = 0
    encounters_seen: int = 0
    claims_written: int = 0
    # Counted in dicts, not Counters: a Counter counts in interpreted Python (its __init__ and
    # update), ~25,000 instructions a group of ~6 decisions, 0.4% of a replay.
    outcomes: dict[str, int] = field(default_factory=dict)  # decisions by outcome
    findings: dict[tuple[str, str], int] = field(default_factory=dict)  # findings by (rule, severity)


def plan(
    files: Iterable[Path],
    directory: Path,
    shard: Shard = Shard(),
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    workers: int = 1,
) -> Plan:
    """Read every input once, spilling each resource of this shard to its partition in
    `directory` and keeping the shared ones in memory.

    The inputs are cut into pieces (a JSON file, or a span of an NDJSON file's lines), routed by
    `workers` processes, each writing the records of a piece to the piece's own files, and taken
    back in input order: every partition gets its resources in the order they were read,
    whatever the number of workers.

    An input error is kept by one shard only (by the hash of where it is), so N shards report
    each bad line once between them.
    """
    files = list(files)
    sizes = [_size(f) for f in files]
    partitions = max(1, min(MAX_PARTITIONS, -(-sum(sizes) // (PARTITION_BYTES * shard.count))))
    # An input of one partition is decided whole: its outputs follow the dates of service
    # throughout (a small replay's review.csv is a worklist in date order).
    groups = 1 if partitions == 1 else -(-sum(sizes) // (GROUP_BYTES * shard.count * partitions))
    piece_bytes = min(max(PIECE_BYTES, sum(sizes) // MAX_PIECES), MAX_PIECE_BYTES)
    spill = Spill(partitions)
    shared = Index()
    errors: list[InputError] = []
    encounters = 0
    pieces: list[Piece] = []
    for path, size in zip(files, sizes):
        for span in _spans(path, size, piece_bytes) if workers > 1 else [None]:
            pieces.append(Piece(path, span, len(pieces)))
    # One worker routes in this process, and tells of the bytes as it reads them: a piece is then
    # a whole file, which may take a minute.
    route = functools.partial(
        route_piece,
        partitions=partitions,
        groups=groups,
        shard=shard,
        max_file_bytes=max_file_bytes,
        directory=directory,
        on_bytes=on_bytes if workers <= 1 else None,
    )
    for number, routed in enumerate(_in_order(route, pieces, workers)):
        for path, extents in routed.written:
            spill.add(path, extents, str(pieces[number].path))
        for source, full_url, raw in routed.shared:
            unread: list[InputError] = []
            if (resource := _parse(raw, source, unread)) is not None:
                shared.add(Entry(resource, source, full_url))
            # Every shard keeps the shared resources: one reports a bad one.
            errors.extend(e for e in unread if _reports(e, shard))
        errors.extend(routed.errors)
        encounters += routed.encounters
        if on_bytes is not None and workers > 1:
            on_bytes(routed.size)
    return Plan(shared, spill, errors, len(files), encounters)


class Piece(NamedTuple):
    """What one routing task reads: a file, or a span of an NDJSON file's lines; the `number`th
    piece of the input, which names the file its records are written to."""

    path: Path
    span: Span | None = None
    number: int = 0

    @property
    def size(self) -> int:
        return _size(self.path) if self.span is None else self.span.end - self.span.start


@dataclass
class Routed:
    """One piece routed: each file it wrote, in the order read, with where its records for each
    partition are in it (`spill.write_piece`'s extents), the shared resources it holds, its
    input errors for this shard."""

    written: list[tuple[Path, dict[int, tuple[int, int]]]]
    shared: list[tuple[str, str | None, bytes]]  # (source, fullUrl, JSON)
    errors: list[InputError]
    encounters: int
    size: int


def route_piece(
    piece: Piece,
    partitions: int,
    groups: int,
    shard: Shard,
    max_file_bytes: int,
    directory: Path,
    on_bytes: Callable[[int], None] | None = None,
) -> Routed:
    """Route the resources of one piece of input to their partitions, written to the piece's
    files in `directory` (see `plan`); `on_bytes(n)` is told of the bytes as they are read."""
    router = _Router(partitions, groups, shard, directory, piece.number)
    errors: list[InputError] = []
    for value in read_file(piece.path, max_file_bytes, on_bytes, parse=routing_view, span=piece.span):
        if isinstance(value, Value) and value.line and value.raw is not None and type(value.value) is dict:
            key = line_route(value.value)
            if not isinstance(key, Unrouted):
                router.put(key, value.value.get("resourceType") == "Encounter", value.raw, value.file, None, value.line)
                continue
        found, errs = _resources(value)
        if errs:
            errors.extend(e for e in errs if _reports(e, shard))
        # (A value of one resource, an NDJSON line, has no other entry to refer to.)
        local = {e.full_url: patient_key(e) for e, _ in found if e.type == "Patient" and e.full_url} if len(found) > 1 else _NOTHING
        for entry, raw in found:
            data = raw if raw is not None else jsonio.dumps(entry.resource)
            router.put(route(entry, local), entry.type == "Encounter", data, entry.source, entry.full_url, 0)
    router.flush()
    return Routed(router.written, router.shared, errors, router.encounters, piece.size)


class _Router:
    """What one routing task has routed so far: its records by partition, the shared resources."""

    def __init__(self, partitions: int, groups: int, shard: Shard, directory: Path, piece: int) -> None:
        self.partitions = partitions
        self.groups = groups
        self.shard = shard
        self.directory = directory
        self.piece = piece
        # By partition * groups + group. A dict, not a list of every block: a piece may be one
        # small Bundle file of a million (one patient each, as Synthea writes them).
        self.blocks: dict[int, list[bytes]] = {}
        self.held = 0  # bytes of records in `blocks`
        self.written: list[tuple[Path, dict[int, tuple[int, int]]]] = []  # each file, its extents
        self.shared: list[tuple[str, str | None, bytes]] = []
        self.encounters = 0

    def put(self, key: str | None, encounter: bool, data: bytes, source: str, full_url: str | None, line: int) -> None:
        """Route one resource (`data`, its JSON) by its `key` (`route`'s). With `line` > 0 it is
        that line of the piece's file, `source`."""
        if key == SHARED:
            self.shared.append((line_source(source, line) if line else source, full_url, data))
            return
        part_shard, partition, group = bucket(key or "", self.shard.count, self.partitions, self.groups)
        if part_shard != self.shard.index:
            return
        self.encounters += encounter
        n = partition * self.groups + group
        block = self.blocks.get(n)
        if block is None:
            block = self.blocks[n] = []
        if line:
            line_record(block, line, data)
        else:
            record(block, source, full_url, data)
        self.held += len(data)
        if self.held >= SPILL_FILE_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the records held to the next file of the piece."""
        if self.held:
            path = piece_path(self.directory, self.piece, len(self.written))
            self.written.append((path, write_piece(path, self.blocks, self.groups)))
            self.blocks = {}
            self.held = 0


_NOTHING: Final[dict[str, str]] = {}


def _reports(error: InputError, shard: Shard) -> bool:
    """Whether this shard reports `error`: one shard of N does, by the hash of where it is."""
    return bucket(error.source, shard.count, 1)[0] == shard.index


def _spans(path: Path, size: int, piece_bytes: int) -> list[Span | None]:
    """The pieces of one input file: an NDJSON file over `piece_bytes` is cut at line ends."""
    if size <= piece_bytes or path.suffix not in NDJSON_SUFFIXES:
        return [None]
    try:
        return list(ndjson_spans(path, piece_bytes))
    except OSError:
        return [None]  # an input error when it is read


def _resources(value: Value | InputError) -> tuple[list[tuple[Entry, bytes | None]], list[InputError]]:
    """The resources of one value read, each with its JSON bytes when they can be kept as read
    (an NDJSON line holding one resource, of which only what routes it was read: `routing_view`);
    a Bundle is parsed again whole, so its entries are written with every digit."""
    if isinstance(value, InputError):
        return [], [value]
    if value.raw is not None and isinstance(value.value, dict) and value.value.get("resourceType") != "Bundle":
        try:
            return [(Entry(check_resource(value.value, value.source), value.source), value.raw)], []
        except InputError as exc:
            return [], [exc]
    unread: list[InputError] = []
    document = value.value if value.raw is None else _parse(value.raw, value.source, unread)
    if unread:
        return [], unread
    entries, errors = load_value(document, value.source)
    return [(e, None) for e in entries], errors


def decide(plan: Plan, partition: int, rules: RuleSet, validation: Validation) -> Iterator[tuple[Index, RunResult]]:
    """One partition through the one decision step, a group at a time, each group on top of the
    shared resources: a group's resources are parsed, decided and let go before the next's are
    read, so what the decision walks (and frees) stays in the processor's caches."""
    for group in plan.spill.read(partition):
        index = Index.over(plan.shared)
        errors: list[InputError] = []
        for source, full_url, raw in group:
            if (resource := _parse(raw, source, errors)) is not None:
                index.add(Entry(resource, source, full_url))
        result = evaluate(index, rules, validation)
        result.errors[:0] = errors
        yield index, result
        del index, result


def _parse(raw: bytes, source: str, errors: list[InputError]) -> Any:
    """A routed resource read whole, or None with its error added to `errors`: routing read only
    the members that route it, and checked the rest's syntax, but not yet that each number is
    one (`1e400`)."""
    try:
        return jsonio.loads(raw)
    except jsonio.JSONDecodeError as exc:
        errors.append(InvalidJSON(f"malformed JSON ({exc})", source))
        return None


def part_of(index: Index, run: RunResult, shared: int) -> Part:
    """What a decided group writes and counts."""
    outcomes: dict[str, int] = {}
    findings: dict[tuple[str, str], int] = {}
    for decision in run.decisions:
        outcomes[decision.outcome] = outcomes.get(decision.outcome, 0) + 1
        for finding in decision.findings:
            key = (finding.rule, finding.severity)
            findings[key] = findings.get(key, 0) + 1
    return Part(
        decisions=b"".join(jsonio.dumps_line(d.to_json()) for d in run.decisions),
        claims=b"".join(jsonio.dumps_line(c.resource) for c in run.claims),
        review=review_csv(run.claims),
        errors=run.errors,
        resources=len(index) - shared,
        encounters_seen=run.encounters_seen,
        claims_written=len(run.claims),
        outcomes=outcomes,
        findings=findings,
    )


def joined(parts: list[Part]) -> Part:
    """The groups of a partition as one Part, their lines in the order of the groups."""
    if len(parts) == 1:
        return parts[0]
    whole = Part(
        decisions=b"".join(p.decisions for p in parts),
        claims=b"".join(p.claims for p in parts),
        review=b"".join(p.review for p in parts),
    )
    for part in parts:
        whole.errors.extend(part.errors)
        whole.resources += part.resources
        whole.encounters_seen += part.encounters_seen
        whole.claims_written += part.claims_written
        _add(whole.outcomes, part.outcomes)
        _add(whole.findings, part.findings)
    return whole


def _add(counts: dict[_K, int], more: dict[_K, int]) -> None:
    """Add the counts `more` to `counts` (`Counter.update`, in compiled code)."""
    for key, n in more.items():
        counts[key] = counts.get(key, 0) + n


def run(
    plan: Plan,
    rules: RuleSet,
    validation: Validation,
    workers: int = 1,
    on_decided: Callable[[Index, RunResult], None] | None = None,
) -> Iterator[Part]:
    """Every partition decided, in partition order. With `workers` > 1 they are decided in
    that many processes (forked: they inherit the plan and the rules) and still come back in
    order. `on_decided(index, result)` sees each partition's full result, in this process
    (so only with one worker): `replay --fhir-base` writes its Claims from there."""
    if on_decided is not None and workers > 1:
        raise ValueError("on_decided needs the partitions decided in this process (workers=1)")
    if workers > 1 and validation != "none":
        load_claim_models()
    global _WORK
    _WORK = (plan, rules, validation, on_decided)
    try:
        yield from _in_order(_decide_part, range(plan.spill.partitions), workers)
    finally:
        _WORK = None


# What `_decide_part` works on: set by `run` before workers are forked, so they inherit it.
_WORK: tuple[Plan, RuleSet, Validation, Callable[[Index, RunResult], None] | None] | None = None


def _decide_part(partition: int) -> Part:
    assert _WORK is not None, "set by run()"
    plan, rules, validation, on_decided = _WORK
    parts = []
    for index, result in decide(plan, partition, rules, validation):
        if on_decided is not None:
            on_decided(index, result)
        parts.append(part_of(index, result, len(plan.shared)))
        del index, result  # before the next group is read
    return joined(parts) if parts else Part()


def _in_order(function: Callable[[_T], _R], items: Sequence[_T], workers: int) -> Iterator[_R]:
    """`function(item)` for each item, in the items' order: in this process, or with `workers`
    > 1 in that many forked processes (they inherit what this one holds, the arguments and
    results travel pickled). At most a window of results waits for an earlier one."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield _without_gc(function, item)
        return
    # What the workers inherit is kept out of their collector's way: a collection walking it
    # would write to every object's header and copy each page of it into each worker.
    gc.freeze()
    # Imported here: a one-worker run (the default on one CPU, each shard of a fan-out) needs none of it.
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque[Future[_R]] = deque()
        for item in items:
            pending.append(pool.submit(_without_gc, function, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _without_gc(function: Callable[[_T], _R], item: _T) -> _R:
    """`function(item)` with no garbage collection while it runs, and one collection after.

    Parsed FHIR JSON makes no reference cycles, so the collector finds nothing while a
    partition's heap grows, yet its passes over it cost ~15% of a replay. Once `function` has
    returned, the partition's objects are gone by reference counting, and the one collection
    sweeps up whatever cycle there was, keeping memory flat. What survives it lives for the
    run (modules, models, rule tables, the shared resources, caches) and is frozen out of the
    collector's way, so each collection looks only at what one item left behind."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return function(item)
    finally:
        if enabled:
            gc.enable()
        gc.collect()
        gc.freeze()


def workers_default() -> int:
    """The CPUs this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # an input error when it is read
