"""FHIR Bulk Data export (https://hl7.org/fhir/uv/bulkdata/) as replay's input.

One export, as the Bulk Data Access IG has it:

    kick-off   GET [base]/$export, [base]/Patient/$export or [base]/Group/{id}/$export
               Prefer: respond-async; _outputFormat=application/fhir+ndjson, _type, _since
               -> 202 and the status URL in Content-Location (4xx + OperationOutcome: refused)
    status     GET the status URL: 202 while running (Retry-After, X-Progress), 200 and the
               manifest when done, 4xx/5xx + OperationOutcome when the export failed
    files      GET each `output[].url`, with our credentials when `requiresAccessToken`; the
               `error[]` files hold OperationOutcomes about resources the server left out
    clean-up   DELETE the status URL: the server may drop the files (or stop a running job)

Everything goes through `FHIRClient`: the same retries, auth (bearer or SMART Backend Services)
and transport as every other request. Files are streamed to disk, never held in memory.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from . import jsonio
from .errors import (
    AuthError,
    BadManifest,
    ExportFailed,
    ExportRefused,
    ExportTimedOut,
    FatalFHIRError,
    FHIRError,
    InputError,
    UsageError,
)
from .fhir_client import FHIRClient, outcome_text
from .notifications import ID_PATTERN, INSTANT_PATTERN, TYPE_PATTERN
from .retry import RetryPolicy, parse_retry_after
from .settings import Settings
from .vocabulary import SHARED_RESOURCE_TYPES

__all__ = ["DEFAULT_MAX_WAIT", "Export", "Manifest", "ManifestFile", "bulk_export", "check_group", "check_instant"]

log = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
# Exports of a health system's year take hours; past this we give up (G0129_BULK_EXPORT_MAX_WAIT).
DEFAULT_MAX_WAIT = Settings().bulk_export_max_wait
_INSTANT = re.compile(INSTANT_PATTERN)
_ID = re.compile(ID_PATTERN)
_TYPE = re.compile(TYPE_PATTERN)


def check_instant(value: str) -> str:
    """`value` if it is a FHIR instant (a date and time with seconds and a zone, that exists)."""
    try:
        if _INSTANT.fullmatch(value):
            datetime.fromisoformat(value)
            return value
    except ValueError:
        pass
    raise UsageError(f"--since must be a FHIR instant such as 2026-01-01T00:00:00Z, got {value!r}")


def check_group(value: str) -> str:
    if not _ID.fullmatch(value) or value in (".", ".."):
        raise UsageError(f"--group must be a FHIR id (letters, digits, '-' and '.', at most 64), got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ManifestFile:
    type: str
    url: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a completed export holds (the status URL's 200 answer)."""

    transaction_time: str
    requires_access_token: bool
    output: tuple[ManifestFile, ...]
    error: tuple[ManifestFile, ...]

    @classmethod
    def parse(cls, body: bytes, where: str) -> Manifest:
        """The manifest in `body`, or BadManifest naming what is wrong with it."""
        try:
            manifest = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadManifest(f"bulk export manifest from {where} is not JSON") from None
        if not isinstance(manifest, dict):
            raise BadManifest(f"bulk export manifest from {where} is not a JSON object")
        time_ = manifest.get("transactionTime")
        token = manifest.get("requiresAccessToken")
        if not isinstance(time_, str):
            raise BadManifest(f"bulk export manifest from {where} has no transactionTime")
        if not isinstance(token, bool):
            raise BadManifest(f"bulk export manifest from {where}: requiresAccessToken must be true or false, got {token!r}")
        return cls(time_, token, _files(manifest, "output", where), _files(manifest, "error", where))


def _files(manifest: dict[str, Any], key: str, where: str) -> tuple[ManifestFile, ...]:
    items = manifest.get(key, [])  # `error` is required, but an empty one is often left out
    if not isinstance(items, list):
        raise BadManifest(f"bulk export manifest from {where}: {key} is not a list")
    files = []
    for n, item in enumerate(items):
        type_ = item.get("type") if isinstance(item, dict) else None
        url = item.get("url") if isinstance(item, dict) else None
        # The type names the file on disk: a resource type's shape, never a path.
        if not isinstance(type_, str) or not _TYPE.fullmatch(type_) or not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise BadManifest(f"bulk export manifest from {where}: {key}[{n}] needs a resource type and an http(s) url")
        files.append(ManifestFile(type_, url))
    return tuple(files)


@dataclass(frozen=True, slots=True)
class Export:
    """The downloaded export: NDJSON files to read, and the error files' OperationOutcomes as
    input errors (resources the server could not export). `transaction_time` is the instant
    the data is current as of: the `--since` of the next incremental export."""

    files: tuple[Path, ...]
    errors: tuple[InputError, ...]
    transaction_time: str


class _Clock:
    """The time left for the whole export; `sleep` and `now` are the tests' seams."""

    def __init__(self, max_wait: float, sleep: Callable[[float], Awaitable[None]], now: Callable[[], float]) -> None:
        self.max_wait = max_wait
        self.sleep = sleep
        self.now = now
        self.deadline = now() + max_wait


async def bulk_export(
    client: FHIRClient,
    directory: Path,
    types: Sequence[str],
    *,
    since: str | None = None,
    group: str | None = None,
    patients: bool = False,
    poll: RetryPolicy | None = None,
    max_wait: float = DEFAULT_MAX_WAIT,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    now: Callable[[], float] = time.monotonic,
) -> Export:
    """Export `types` from `client`'s server into `directory` and download the files.

    System level by default; `patients` for Patient level, `group` for one Group's patients. A
    Patient or Group export holds only the Patient compartment, so the shared resources the
    decision reads (SHARED_RESOURCE_TYPES: who performed a session, the payor) come from a
    second, system-level export of those types. `poll` paces the status requests when the
    server sends no Retry-After, and caps the Retry-After it sends (`retry_after_cap`).
    """
    clock = _Clock(max_wait, sleep, now)
    policy = poll or RetryPolicy()
    if group is not None:
        check_group(group)
        path = f"Group/{group}/$export"
    else:
        path = "Patient/$export" if patients else "$export"
    exports = [(path, tuple(types))]
    if path != "$export":
        compartment = tuple(t for t in types if t not in SHARED_RESOURCE_TYPES)
        shared = tuple(t for t in types if t in SHARED_RESOURCE_TYPES)
        exports = [(path, compartment)] + ([("$export", shared)] if shared else [])
    files: list[Path] = []
    errors: list[InputError] = []
    transaction_time = ""
    for n, (operation, wanted) in enumerate(exports):
        manifest, got, bad = await _one_export(client, operation, wanted, since, directory, f"{n}-", clock, policy)
        files += got
        errors += bad
        # The older instant: an incremental export from it misses nothing of either.
        transaction_time = min(transaction_time, manifest.transaction_time) if transaction_time else manifest.transaction_time
    return Export(tuple(files), tuple(errors), transaction_time)


async def _one_export(
    client: FHIRClient,
    operation: str,
    types: Sequence[str],
    since: str | None,
    directory: Path,
    prefix: str,
    clock: _Clock,
    policy: RetryPolicy,
) -> tuple[Manifest, list[Path], list[InputError]]:
    status_url = await _kick_off(client, operation, types, since)
    try:
        manifest = await _wait(client, status_url, clock, policy)
        files = []
        for n, item in enumerate(manifest.output):
            files.append(await _download(client, item, directory / f"{prefix}{n:04d}.{item.type}.ndjson", manifest))
        errors = []
        for n, item in enumerate(manifest.error):
            path = await _download(client, item, directory / f"{prefix}{n:04d}.errors", manifest)
            errors += _outcomes(path, item.url)
        return manifest, files, errors
    finally:
        # Done: the server may drop the files. Not done (failed, timed out, interrupted): it may
        # stop the job. Either way a courtesy the spec asks for; its failure changes nothing.
        try:
            await client.send("DELETE", status_url)
        except FHIRError as exc:
            log.info("bulk export clean-up: %s", exc)


async def _kick_off(client: FHIRClient, operation: str, types: Sequence[str], since: str | None) -> str:
    params = [("_outputFormat", NDJSON), ("_type", ",".join(types))] + ([("_since", since)] if since else [])
    try:
        response = await client.send(
            "GET", operation, params=params, headers={"Accept": "application/fhir+json", "Prefer": "respond-async"}
        )
    except AuthError:
        raise
    except FatalFHIRError as exc:
        raise ExportRefused(f"bulk export kick-off refused: {exc}", status=exc.status) from None
    status_url: str | None = response.headers.get("Content-Location")
    if response.status_code != 202 or not status_url:
        raise ExportRefused(
            f"bulk export kick-off {response.request.url} answered {response.status_code}"
            f"{'' if status_url else ' without a status URL (Content-Location)'}; a Bulk Data server answers 202 with one"
        )
    return status_url


async def _wait(client: FHIRClient, status_url: str, clock: _Clock, policy: RetryPolicy) -> Manifest:
    """Poll the status URL until the manifest is there, the export failed, or time is up."""
    attempt = 0
    while True:
        try:
            response = await client.send("GET", status_url, headers={"Accept": "application/json"})
        except AuthError:
            raise
        except FHIRError as exc:
            raise ExportFailed(f"bulk export failed: {exc}", status=exc.status) from None
        if response.status_code == 200:
            return Manifest.parse(response.content, status_url)
        if response.status_code != 202:
            raise ExportFailed(f"bulk export status {status_url} answered {response.status_code}, neither 202 (running) nor 200 (done)")
        attempt += 1
        progress = response.headers.get("X-Progress", "in progress")
        left = clock.deadline - clock.now()
        if left <= 0:
            raise ExportTimedOut(f"bulk export not complete after {clock.max_wait:g} s ({progress}); status {status_url}")
        delay = min(policy.delay(attempt, parse_retry_after(response.headers.get("Retry-After"))), left)
        log.info("bulk export: %s; next look in %.1f s", progress, delay)
        await clock.sleep(delay)


async def _download(client: FHIRClient, item: ManifestFile, path: Path, manifest: Manifest) -> Path:
    try:
        size = await client.download(
            item.url, path, headers={"Accept": NDJSON}, authenticate=manifest.requires_access_token
        )
    except AuthError:
        raise
    except FHIRError as exc:
        raise ExportFailed(f"bulk export file {item.url} ({item.type}): {exc}", status=exc.status) from None
    log.info("bulk export: %s, %d bytes of %s", item.url, size, item.type)
    return path


def _outcomes(path: Path, url: str) -> list[InputError]:
    """The errors an error file reports: one per OperationOutcome with an error or fatal issue
    (warnings and information are logged)."""
    errors = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            source = f"{url}:{number}"
            try:
                outcome = jsonio.loads(line)
            except jsonio.JSONDecodeError:
                errors.append(InputError("bulk export error file line is not JSON", source))
                continue
            if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
                errors.append(InputError("bulk export error file line is not an OperationOutcome", source))
                continue
            issues = [i for i in outcome.get("issue") or () if isinstance(i, dict)]
            text = outcome_text(outcome) or "no diagnostics"
            if any(i.get("severity") in ("error", "fatal") for i in issues):
                errors.append(InputError(f"the server could not export: {text}", source))
            else:
                log.info("bulk export %s: %s", source, text)
    return errors
