"""Where results go: a directory of NDJSON files, swapped in as one set when a run is whole."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from . import jsonio
from .errors import InputError, InvalidElement, UsageError

__all__ = ["DirectorySink", "error_record"]

FILES = ("decisions.ndjson", "claims.ndjson", "errors.ndjson", "review.csv")


def error_record(error: InputError) -> dict[str, Any]:
    record: dict[str, Any] = {"source": error.source, "error": type(error).__name__, "message": error.message}
    if isinstance(error, InvalidElement):
        record |= {"resource": error.resource, "element": error.element, "value": error.value}
    return record


class DirectorySink:
    """Writes decisions.ndjson, claims.ndjson, errors.ndjson and review.csv into `directory`, as
    one set.

    The four are written into a run directory of their own (`.g0129-run-*` inside `directory`)
    and swapped in together when the whole run has finished: a journal (`.g0129-swap`) names
    the run being swapped in, so a run killed in the middle of the swap is completed by the next
    one, and a run killed while writing leaves only its run directory, which the next one
    removes. A reader never sees half a run, nor files of two runs. One run at a time writes to
    a directory (an advisory lock); a second one is refused.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._run: Path | None = None
        self._lock: IO[bytes] | None = None
        self._files: dict[str, IO[bytes]] = {}

    def __enter__(self) -> DirectorySink:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.directory / LOCK, "ab")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise UsageError(f"--out {self.directory}: another g0129 run is writing there") from None
        recover(self.directory)
        self._run = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=self.directory))
        for name in FILES:
            self._files[name] = open(self._run / name, "wb")
        return self

    def write(self, name: str, record: dict[str, Any]) -> None:
        """One line of `name`.ndjson."""
        self._files[f"{name}.ndjson"].write(jsonio.dumps_line(record))

    def write_block(self, name: str, block: bytes) -> None:
        """Append lines already made (a replay partition's results) to the file `name` names:
        `decisions` is decisions.ndjson, `review` is review.csv."""
        self._files[next(f for f in FILES if f.partition(".")[0] == name)].write(block)

    @property
    def scratch(self) -> Path:
        """A directory for the run's temporary files, removed with the run directory."""
        assert self._run is not None, "inside `with DirectorySink(...)` only"
        path = self._run / "scratch"
        path.mkdir(exist_ok=True)
        return path

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for fh in self._files.values():
                fh.flush()
                if exc_type is None:
                    os.fsync(fh.fileno())
                fh.close()
            self._files.clear()
            if self._run is not None:
                if exc_type is None:
                    _fsync_dir(self._run)
                    journal = self.directory / JOURNAL
                    _write_atomically(journal, self._run.name.encode())
                    _swap_in(self.directory, self._run, journal)
                else:
                    shutil.rmtree(self._run, ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.close()  # releases the lock
                self._lock = None


LOCK = ".g0129-lock"
JOURNAL = ".g0129-swap"
RUN_PREFIX = ".g0129-run-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _swap_in(directory: Path, run: Path, journal: Path) -> None:
    """Move the run's files into place, then drop the journal and the run directory."""
    for name in FILES:
        source = run / name
        if source.exists():  # already moved by a swap that was interrupted
            os.replace(source, directory / name)
    _fsync_dir(directory)
    journal.unlink(missing_ok=True)
    shutil.rmtree(run, ignore_errors=True)


def recover(directory: Path) -> None:
    """Finish the swap of a run killed while swapping in; remove what killed runs left."""
    journal = directory / JOURNAL
    if journal.exists():
        run = directory / journal.read_text(encoding="utf-8").strip()
        if run.name.startswith(RUN_PREFIX) and run.parent == directory and run.is_dir():
            _swap_in(directory, run, journal)
        journal.unlink(missing_ok=True)
    for leftover in directory.glob(f"{RUN_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    # Written by releases before 2026.11.1, beside the outputs.
    for name in ("decisions", "claims", "errors"):
        for leftover in directory.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)
    (directory / (JOURNAL + ".tmp")).unlink(missing_ok=True)
