"""Raw FHIR JSON in, an index of resources out, with references resolved across all of it.

Inputs are Bundles of any type, single resources, directories of them and NDJSON files. The
hot path stays on plain dicts (parsed by `jsonio`): full model validation costs ~100x the parse
(DESIGN.md), so it is kept for what we write back. Every resource keeps its raw JSON, so a
write-back never drops an element the models do not know.

One bad input never stops the others: `load_paths` returns the errors beside the index.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, NamedTuple

from . import jsonio
from .errors import InputError, InvalidJSON, InvalidResource, NotFHIR
from .fhir_models import is_resource_type

__all__ = [
    "Entry",
    "Index",
    "check_resource",
    "load_bytes",
    "load_value",
    "load_file",
    "load_paths",
    "iter_input_files",
    "line_source",
    "ndjson_spans",
    "read_file",
    "Span",
    "type_id_tail",
    "Value",
]

Resource = dict[str, Any]

INPUT_SUFFIXES: Final = (".json", ".ndjson", ".jsonl")
NDJSON_SUFFIXES: Final = (".ndjson", ".jsonl")
# NDJSON is read in blocks of this size, and progress reported after each: often enough to move
# a display, seldom enough to cost nothing next to parsing.
_BLOCK_BYTES = 1 << 16
# How much of a file `ndjson_spans` looks at at once.
_SCAN_BYTES = 1 << 20


class Entry:
    """One resource as it came in, with where it came from.

    `key` is `Type/id` (or the fullUrl for a resource without an id); `base` is the server base
    of the fullUrl, against which the entry's relative references resolve. Both are computed
    once: reference resolution asks for them hundreds of thousands of times in a big replay.
    `derived` is for a reader to keep what it works out from this resource alone, by kind, each
    beside what else it depends on (the rule tables): a replay's shared resources outlive the
    groups of patients that refer to them, and what is read from one is read once a run.
    """

    __slots__ = ("resource", "source", "full_url", "type", "id", "key", "base", "derived")

    def __init__(self, resource: Resource, source: str, full_url: str | None = None) -> None:
        self.resource = resource
        self.source = source
        self.full_url = full_url
        self.type = str(resource["resourceType"])
        rid = resource.get("id")
        self.id = str(rid) if rid is not None else None
        if self.id is not None:
            self.key = f"{self.type}/{self.id}"
        else:
            self.key = full_url or f"{self.type}/@{id(resource)}"
        self.base = _base_of(full_url)
        self.derived: dict[str, tuple[object, Any]] | None = None

    def __repr__(self) -> str:
        return f"Entry({self.key!r}, source={self.source!r})"


def _base_of(url: str | None) -> str | None:
    if not url or "://" not in url:
        return None
    parts = url.rstrip("/").split("/")
    # .../fhir/Claim/123 -> .../fhir/
    return "/".join(parts[:-2]) + "/" if len(parts) >= 5 else None


def _version_rank(resource: Resource) -> tuple[int, str]:
    meta = resource.get("meta") or {}
    vid = str(meta.get("versionId") or "")
    return (int(vid) if vid.isdigit() else -1, str(meta.get("lastUpdated") or ""))


@dataclass
class Index:
    """Every resource of a run, findable by `Type/id`, by fullUrl and by type.

    An index made `over` another (a replay's shared resources) finds that one's resources too,
    as if they had been added to it first, without copying or changing it."""

    by_key: dict[str, Entry] = field(default_factory=dict)
    by_full_url: dict[str, Entry] = field(default_factory=dict)
    by_type: dict[str, list[Entry]] = field(default_factory=dict)
    base: Index | None = None
    # Keys of `base` this index has a resource of its own for (newer, or `replace`d), and the
    # fullUrls of `base`'s resources it `replace`d: neither is found in `base` any more.
    shadowed: set[str] = field(default_factory=set)
    hidden_urls: set[str] = field(default_factory=set)

    def add(self, entry: Entry) -> None:
        key = entry.key
        current = self.get(key)
        if current is not None:
            # The same resource seen twice (a standalone file and a bundle, or two versions):
            # keep the newer version; on a tie the first one seen stays. A copy from another
            # server (another fullUrl) stays reachable by its fullUrl.
            if _version_rank(entry.resource) <= _version_rank(current.resource):
                if entry.full_url and self.by_url(entry.full_url) is None:
                    self.by_full_url[entry.full_url] = entry
                return
            self._forget(current)
        self.by_key[key] = entry
        if entry.full_url:
            self.by_full_url[entry.full_url] = entry
        self.by_type.setdefault(entry.type, []).append(entry)

    def replace(self, entry: Entry) -> None:
        """Put `entry` in place of the resource of the same key, whatever the versions say
        (the server's copy of a Claim stands for it, older or newer than a file's)."""
        current = self.get(entry.key)
        if current is not None:
            self._forget(current)
            if current.full_url and self.by_url(current.full_url) is current:
                self.by_full_url.pop(current.full_url, None)
                if self.base is not None and self.base.by_url(current.full_url) is current:
                    self.hidden_urls.add(current.full_url)
            self.by_key.pop(entry.key, None)
        self.add(entry)

    def _forget(self, current: Entry) -> None:
        """Take `current` out of the types listed, before another resource of its key comes in."""
        if self.by_key.get(current.key) is current:
            self.by_type[current.type] = [e for e in self.by_type[current.type] if e is not current]
        else:
            self.shadowed.add(current.key)

    @classmethod
    def over(cls, shared: Index) -> Index:
        """An empty index on top of `shared` (the Organizations and Practitioners every patient
        refers to), for one part of a replay: it finds `shared`'s resources and leaves it as it is."""
        return cls(base=shared)

    def get(self, key: str) -> Entry | None:
        """The resource of key `Type/id` (or the fullUrl of one without an id), or None."""
        hit = self.by_key.get(key)
        if hit is None and self.base is not None and key not in self.shadowed:
            return self.base.get(key)
        return hit

    def by_url(self, url: str) -> Entry | None:
        """The resource of fullUrl `url`, or None."""
        hit = self.by_full_url.get(url)
        if hit is None and self.base is not None and url not in self.hidden_urls:
            return self.base.by_url(url)
        return hit

    def of_type(self, resource_type: str) -> list[Entry]:
        own = self.by_type.get(resource_type, [])
        if self.base is None:
            return own
        below = self.base.of_type(resource_type)
        if self.shadowed and below:
            below = [e for e in below if e.key not in self.shadowed]
        return below + own if below and own else below or own

    def resolve(self, reference: Any, context: Entry | None = None) -> Resource | None:
        """The resource a Reference points at, or None (identifier-only, display-only, dangling).

        Handles `#id` (contained in the context resource), `urn:uuid:`/absolute fullUrls,
        relative `Type/id` (against the context entry's base first), and `/_history/n` tails.
        """
        found = self.resolve_entry(reference, context)
        if isinstance(found, Entry):
            return found.resource
        return found

    def resolve_entry(self, reference: Any, context: Entry | None = None) -> Entry | Resource | None:
        if not isinstance(reference, dict):
            return None
        ref = reference.get("reference")
        if not isinstance(ref, str) or not ref:
            return None
        if ref.startswith("#"):
            if context is None:
                return None
            local = ref[1:]
            for contained in context.resource.get("contained") or ():
                if isinstance(contained, dict) and contained.get("id") == local:
                    return contained
            return None
        hit = self.by_url(ref)
        if hit is not None:
            return hit
        if "://" in ref:
            return self.get(type_id_tail(ref))
        if context is not None and context.base:
            hit = self.by_url(context.base + ref)
            if hit is not None:
                return hit
        return self.get(type_id_tail(ref))

    def __len__(self) -> int:
        return len(self.by_key) + (len(self.base) - len(self.shadowed) if self.base is not None else 0)


def type_id_tail(ref: str) -> str:
    if ref.count("/") == 1 and not ref.endswith("/") and "?" not in ref:
        # Already `Type/id`, as nearly every reference is: resolution asks this for each one.
        return ref
    parts = ref.split("?")[0].rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return "/".join(parts[-2:])


def check_resource(value: Any, source: str) -> Resource:
    """`value`, if it is a FHIR resource we can read (an object with an R4 resourceType and a
    string id, if any); else raises the InputError saying why not."""
    if not isinstance(value, dict):
        raise NotFHIR(f"expected a JSON object, got {type(value).__name__}", source)
    rtype = value.get("resourceType")
    if not isinstance(rtype, str):
        raise NotFHIR("no resourceType: not a FHIR resource", source)
    if not is_resource_type(rtype):
        raise InvalidResource(f"unknown resourceType {rtype!r} (not an R4 resource)", source)
    rid = value.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidResource(f"{rtype}.id must be a string", source)
    return value


def _walk(resource: Resource, source: str, full_url: str | None, out: list[Entry], errors: list[InputError]) -> None:
    """Append the resource, or for a Bundle its entries' resources (recursively), to `out`."""
    if resource["resourceType"] != "Bundle":
        out.append(Entry(resource, source, full_url))
        return
    entries = resource.get("entry") or []
    if not isinstance(entries, list):
        errors.append(InvalidResource("Bundle.entry must be an array", source))
        return
    for n, item in enumerate(entries):
        if not isinstance(item, dict):
            errors.append(InvalidResource(f"Bundle.entry[{n}] must be an object", source))
            continue
        request = item.get("request")
        if isinstance(request, dict) and request.get("method") == "DELETE":
            continue
        inner = item.get("resource")
        if inner is None:
            continue  # response-only or GET entries carry no resource
        try:
            inner = check_resource(inner, f"{source} Bundle.entry[{n}]")
        except InputError as exc:
            errors.append(exc)
            continue
        fu = item.get("fullUrl")
        _walk(inner, source, fu if isinstance(fu, str) else None, out, errors)


def load_value(value: Any, source: str) -> tuple[list[Entry], list[InputError]]:
    """Entries of an already-parsed JSON value: a resource or a Bundle (e.g. a search result)."""
    errors: list[InputError] = []
    entries: list[Entry] = []
    try:
        resource = check_resource(value, source)
    except InputError as exc:
        return [], [exc]
    _walk(resource, source, None, entries, errors)
    return entries, errors


def load_bytes(
    data: bytes, source: str, ndjson: bool = False, on_bytes: Callable[[int], None] | None = None
) -> tuple[list[Entry], list[InputError]]:
    """Parse one input's bytes (a JSON resource/Bundle, or NDJSON) into entries and errors.

    `on_bytes(n)`, when given, is told how many more bytes have been read (for a progress
    display): NDJSON as its lines go by, so a large export moves the display; JSON once parsed.
    The numbers add up to `len(data)`.
    """
    if ndjson:
        values = _ndjson_values(_bounded_lines(io.BytesIO(data), len(data), on_bytes=on_bytes), source)
    else:
        values = iter([_json_value(data, source, on_bytes)])
    return _entries_of(values)


def _json_value(data: bytes, source: str, on_bytes: Callable[[int], None] | None) -> Value | InputError:
    try:
        return Value(source, jsonio.loads(data[3:] if data.startswith(b"\xef\xbb\xbf") else data))
    except jsonio.JSONDecodeError as exc:
        return InvalidJSON(f"malformed JSON ({exc})", source)
    finally:
        if on_bytes is not None:
            on_bytes(len(data))


def _entries_of(values: Iterable[Value | InputError]) -> tuple[list[Entry], list[InputError]]:
    entries: list[Entry] = []
    errors: list[InputError] = []
    for value in values:
        if isinstance(value, InputError):
            errors.append(value)
            continue
        found, errs = load_value(value.value, value.source)
        entries.extend(found)
        errors.extend(errs)
    return entries, errors


class Value:
    """One JSON document read: a file's, or an NDJSON line's with the line's bytes (`raw`) and
    its number (`line`, from 1; 0 for a file's document).

    A plain class: one is made for every line of an export, and a dataclass's `__init__` (run
    by the interpreter, even in the compiled build) took a third of the time to read a line.
    For the same reason a line's `source` (`file:line`) is only made when asked for: replay's
    routing pass writes the line number alone."""

    __slots__ = ("file", "value", "raw", "line")

    def __init__(self, file: str, value: Any, raw: bytes | None = None, line: int = 0) -> None:
        self.file = file
        self.value = value
        self.raw = raw
        self.line = line

    @property
    def source(self) -> str:
        """Where the value is: the file, and for an NDJSON line `file:line`."""
        return line_source(self.file, self.line) if self.line else self.file

    def __repr__(self) -> str:
        return f"Value(source={self.source!r}, value={self.value!r})"


def line_source(file: str, line: int | str) -> str:
    """Where line `line` (its number, or the number's digits) of the NDJSON file `file` is, as
    errors and decisions say it."""
    return f"{file}:{line}"


def _ndjson_values(
    lines: Iterable[bytes | int],
    source: str,
    parse: Callable[[bytes], Any] = jsonio.loads,
    first_line: int = 1,
) -> Iterator[Value | InputError]:
    """The JSON value of each NDJSON line (an int stands for a line too long to read, of that
    length), the first being line `first_line` of the file, as `parse` reads it (it raises
    `jsonio.JSONDecodeError` for a line that is not JSON); the line's bytes are kept (`Value.raw`)."""
    for lineno, line in enumerate(lines, start=first_line):
        if isinstance(line, int):
            yield InputError(f"a line of {line} bytes, over the limit (--max-file-bytes): not read", line_source(source, lineno))
            continue
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line or line.isspace():  # (not `strip`, which copies every line)
            continue
        try:
            yield Value(source, parse(line), line, lineno)
        except jsonio.JSONDecodeError as exc:
            yield InvalidJSON(f"malformed JSON ({exc})", line_source(source, lineno))


def iter_input_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Each input file, directories walked recursively in a stable order.

    Inside a directory only `.json`, `.ndjson` and `.jsonl` files are read, and not the
    `*.expected.*` files of a test scenario (a README or an `NN-x.expected.json` beside the data
    is not input); a file named on the command line is always read.
    """
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if name.endswith(INPUT_SUFFIXES) and ".expected." not in name:
                        yield Path(root) / name
        else:
            yield path


# A JSON document is parsed whole, so it is read whole: this bounds what one file may take.
DEFAULT_MAX_FILE_BYTES: Final = 512 * 1024 * 1024


def load_file(
    path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES, on_bytes: Callable[[int], None] | None = None
) -> tuple[list[Entry], list[InputError]]:
    """The entries of one input file (see `read_file`)."""
    return _entries_of(read_file(path, max_bytes, on_bytes))


class Span(NamedTuple):
    """Whole lines of an NDJSON file: bytes [start, end), the first being line `first_line`
    (so an error names the line of the file, whichever part of it is being read). A tuple: it
    goes to the routing processes by pickle, which mypyc's frozen dataclasses do not survive."""

    start: int
    end: int
    first_line: int


def ndjson_spans(path: Path, size: int) -> list[Span]:
    """`path`'s lines cut into spans of about `size` bytes each, at line ends. Reads the file
    once, counting lines as it goes: the line numbers of each span are known before any is read."""
    spans: list[Span] = []
    start, first_line = 0, 1  # the span being measured: its first byte and line
    newlines = 0  # line ends met since `start`
    offset = 0  # the file offset of `block[0]`
    with open(path, "rb") as fh:
        while block := fh.read(_SCAN_BYTES):
            at = 0
            while (want := start + size - offset) < len(block):
                cut = block.find(b"\n", max(want, at))
                if cut < 0:
                    break
                newlines += block.count(b"\n", at, cut + 1)
                spans.append(Span(start, offset + cut + 1, first_line))
                start, first_line, newlines, at = offset + cut + 1, first_line + newlines, 0, cut + 1
            newlines += block.count(b"\n", at)
            offset += len(block)
    if offset > start or not spans:
        spans.append(Span(start, offset, first_line))
    return spans


def read_file(
    path: Path,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    parse: Callable[[bytes], Any] = jsonio.loads,
    span: Span | None = None,
) -> Iterator[Value | InputError]:
    """The JSON values of one input file, one by one. Only a regular file is read (a FIFO would
    hang the run, a device such as /dev/zero never ends); a JSON document over `max_bytes` is
    refused before it is read; NDJSON is read line by line, however large, each line up to
    `max_bytes`, each read by `parse` (see `_ndjson_values`), and only the lines of `span` when given."""
    source = str(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            yield InputError("not a regular file (a FIFO, device or socket is never read)", source)
            return
        if path.suffix in NDJSON_SUFFIXES:
            with open(path, "rb") as fh:
                if span is None:
                    yield from _ndjson_values(_bounded_lines(fh, max_bytes, on_bytes=on_bytes), source, parse)
                else:
                    fh.seek(span.start)
                    lines = _bounded_lines(fh, max_bytes, span.end - span.start, on_bytes)
                    yield from _ndjson_values(lines, source, parse, span.first_line)
            return
        if info.st_size > max_bytes:
            yield InputError(f"{info.st_size} bytes, over the limit of {max_bytes} (--max-file-bytes): not read", source)
            return
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        yield InputError(f"cannot read ({exc.strerror or exc})", source)
        return
    if len(data) > max_bytes:  # it grew while we looked
        yield InputError(f"over the limit of {max_bytes} bytes (--max-file-bytes): not read", source)
        return
    yield _json_value(data, source, on_bytes)


def _bounded_lines(
    fh: IO[bytes], max_bytes: int, limit: int | None = None, on_bytes: Callable[[int], None] | None = None
) -> Iterator[bytes | int]:
    """Each line of `fh` (up to `limit` bytes of it, ending at a line end) without its `\\n`, or
    for a line over `max_bytes` its length with it (the line is skipped without being held in
    memory). Read in blocks, which `on_bytes(n)` is told of; only `\\n` ends a line, as in
    NDJSON (a `\\r` is whitespace of the line's JSON)."""
    left = limit
    head: list[bytes] = []  # the start of a line that runs on past the blocks read so far
    held = 0  # its length; once over max_bytes, its bytes are counted, no longer kept
    while left is None or left > 0:
        block = fh.read(_BLOCK_BYTES if left is None else min(_BLOCK_BYTES, left))
        if not block:
            break
        if left is not None:
            left -= len(block)
        if on_bytes is not None:
            on_bytes(len(block))
        # Cut at each line end as a BytesIO finds them (memchr), with no method called on the
        # block: `split` compares every byte in a loop of its own, and `find` took ~1,200
        # instructions a call to look itself up and parse its arguments.
        for line in io.BytesIO(block):
            if not line.endswith(b"\n"):  # after the block's last line end: the start of the next line
                held += len(line)
                if held <= max_bytes:
                    head.append(line)
                else:
                    head.clear()
                break
            line = line[:-1]
            if held:  # the end of the line the blocks before began (the block's first line)
                held += len(line)
                if held <= max_bytes:
                    head.append(line)
                    line = b"".join(head)
                head.clear()
                if held > max_bytes:
                    yield held + 1
                    held = 0
                    continue
                held = 0
            if len(line) > max_bytes:
                yield len(line) + 1
            else:
                yield line
    if held:  # a last line with no line end
        yield b"".join(head) if held <= max_bytes else held


def load_paths(
    paths: Iterable[Path],
    on_file: Callable[[int, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> tuple[Index, list[InputError], int]:
    """Load every input into one index. Returns (index, errors, number of files read).

    For a progress display: `on_file(done, total)` is called after each file, and `on_bytes(n)`
    as bytes are read (see `load_bytes`).
    """
    index = Index()
    errors: list[InputError] = []
    files = list(iter_input_files(paths))
    for n, path in enumerate(files, start=1):
        entries, errs = load_file(path, max_file_bytes, on_bytes)
        errors.extend(errs)
        for entry in entries:
            index.add(entry)
        if on_file is not None:
            on_file(n, len(files))
    return index, errors, len(files)
