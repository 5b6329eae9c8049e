"""Where results go: a directory of NDJSON files (written atomically) or a stream."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from . import jsonio
from .errors import InputError, InvalidElement

__all__ = ["DirectorySink", "error_record"]

FILES = ("decisions", "claims", "errors")


def error_record(error: InputError) -> dict[str, Any]:
    record: dict[str, Any] = {"source": error.source, "error": type(error).__name__, "message": error.message}
    if isinstance(error, InvalidElement):
        record |= {"resource": error.resource, "element": error.element, "value": error.value}
    return record


class DirectorySink:
    """Writes decisions.ndjson, claims.ndjson and errors.ndjson into `directory`.

    Each file is written beside its final name and renamed into place only when the whole run
    has finished, so a reader never sees half a run and a crash leaves the last run intact.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, tuple[IO[bytes], str]] = {}

    def __enter__(self) -> DirectorySink:
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.directory)
            self._files[name] = (os.fdopen(fd, "wb"), tmp)
        return self

    def write(self, name: str, record: dict[str, Any]) -> None:
        self._files[name][0].write(jsonio.dumps(record) + b"\n")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for name, (fh, tmp) in self._files.items():
            fh.flush()
            if exc_type is None:
                os.fsync(fh.fileno())
            fh.close()
            if exc_type is None:
                os.replace(tmp, self.directory / f"{name}.ndjson")
            else:
                os.unlink(tmp)
        self._files.clear()
