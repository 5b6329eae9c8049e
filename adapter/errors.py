"""Every error a user (or a FHIR server) can cause, in one place.

    AdapterError
    ├── InputError                 bad input; the rest of the run goes on
    │   ├── InvalidJSON            not parseable JSON (file, NDJSON line or HTTP body)
    │   ├── NotFHIR                JSON, but not a FHIR resource or Bundle
    │   ├── InvalidResource        a FHIR resource that breaks a rule we rely on
    │   └── InvalidElement         one element's value is not valid FHIR (its encounter is never billed)
    ├── MappingError               a table in mappings/ is missing or malformed
    ├── UsageError                 bad command-line use (exit 2)
    └── FHIRError                  talking to a FHIR server went wrong
        ├── TransientFHIRError     retrying can fix it (network, timeout, 429, 5xx)
        ├── VersionConflict        409/412 on a conditional write: re-read, re-decide
        └── FatalFHIRError         retrying cannot fix it (other 4xx, bad response)
            ├── AuthError          the server or token endpoint refused our credentials
            └── BulkExportError    a FHIR Bulk Data export could not be had:
                ├── ExportRefused      the kick-off was refused (4xx, with its OperationOutcome)
                ├── ExportFailed       the server reported the export as failed
                ├── ExportTimedOut     not complete within the time we wait
                └── BadManifest        the completed export's manifest is not one we can read

The split between transient and fatal lets the worker decide to retry without guessing.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AdapterError",
    "AuthError",
    "BadManifest",
    "BulkExportError",
    "ExportFailed",
    "ExportRefused",
    "ExportTimedOut",
    "FHIRError",
    "FatalFHIRError",
    "InputError",
    "InvalidElement",
    "InvalidJSON",
    "InvalidResource",
    "MappingError",
    "NotFHIR",
    "TransientFHIRError",
    "UsageError",
    "VersionConflict",
]


class AdapterError(Exception):
    """Base of every error this package raises on purpose."""


class InputError(AdapterError):
    """One input (file, NDJSON line, request body) cannot be used.

    `source` names where it came from (a path, `path:line`, or `request body`) so the one-line
    message a user sees always says which input was at fault.
    """

    def __init__(self, message: str, source: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.source = source

    def __str__(self) -> str:
        return f"{self.source}: {self.message}" if self.source else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Made again from its attributes, whatever the subclass's constructor takes: input
        # errors come back from `replay --workers` processes.
        return (_restore, (type(self), str(self.args[0]) if self.args else "", self.__dict__))


def _restore(cls: type[InputError], message: str, state: dict[str, Any]) -> InputError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidJSON(InputError):
    pass


class NotFHIR(InputError):
    pass


class InvalidResource(InputError):
    pass


class InvalidElement(InputError):
    """An element of a resource the rules read holds a value FHIR does not allow (a status that
    is not a code of its value set, a date that is no dateTime). Named down to the value, so the
    EHR team can find and fix the record."""

    def __init__(self, message: str, source: str, resource: str, element: str, value: str) -> None:
        super().__init__(f"{resource} {element}: {message}", source)
        self.resource = resource
        self.element = element
        self.value = value


class MappingError(AdapterError):
    pass


class UsageError(AdapterError):
    pass


class OutputError(AdapterError):
    """The files of a run could not be written or read back under `--out` (a full disk, say):
    the run stops, and what `--out` held before stays as it was."""


class FHIRError(AdapterError):
    """A FHIR server interaction failed. `status` is the HTTP status, when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientFHIRError(FHIRError):
    """Network error, timeout, 429 or 5xx: the same request may succeed later.

    `retry_after` carries the server's Retry-After, in seconds, when it sent one.
    """

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class VersionConflict(FHIRError):
    pass


class FatalFHIRError(FHIRError):
    pass


class AuthError(FatalFHIRError):
    pass


class BulkExportError(FatalFHIRError):
    """A FHIR Bulk Data export (`replay --bulk-export`) could not be had; the message says at
    which step and what the server said."""


class ExportRefused(BulkExportError):
    pass


class ExportFailed(BulkExportError):
    pass


class ExportTimedOut(BulkExportError):
    pass


class BadManifest(BulkExportError):
    pass
