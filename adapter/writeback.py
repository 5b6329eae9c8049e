"""Write an annotated Claim to a FHIR server: never twice, never over a biller's edit.

- An existing Claim is replaced with `PUT` + `If-Match` on the version the decision was made
  from; a 409/412 raises VersionConflict so the caller re-reads, re-decides and tries again.
- A draft (no Claim yet) is created with `If-None-Exist` on its deterministic identifier.
- Each write goes in one transaction with the Provenance that explains it.
- Nothing is written when the annotated Claim equals the server's (annotation is idempotent),
  so a re-run, a duplicate notification or our own write's echo changes nothing.
- The versions we write are recorded, so the notification about them is recognised as ours.
- A dry run writes nothing: it says what would change, as a text diff for a person and as a
  JSON Patch (RFC 6902) for the service's logs.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

# jsonpatch ships no type information; the second code keeps mypy quiet should stubs appear.
import jsonpatch  # type: ignore[import-untyped, unused-ignore]
import orjson

from . import jsonio
from .decision import Decision
from .errors import FatalFHIRError, FHIRError, InvalidResource, VersionConflict
from .fhir_client import FHIRClient
from .ingest import Entry, Index
from .pipeline import AnnotatedClaim, RunResult, evaluate
from .review import review_task, task_condition, task_key, under_review
from .ruleset import RuleSet
from .vocabulary import ANNOTATED_TAG, DRAFT_IDENTIFIER_SYSTEM, draft_identifier, meta_version

__all__ = ["WriteResult", "Writer", "claim_diff", "claim_patch", "provenance", "push_claims", "settle"]

log = logging.getLogger(__name__)

AGENT = "G0129 billing adapter"
MAX_CONFLICTS = 3
_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


@dataclass(frozen=True, slots=True)
class WriteResult:
    claim: str  # Claim/<id>
    result: str  # created | updated | unchanged | dry-run
    version: str | None = None
    diff: str = ""
    decisions: tuple[Decision, ...] = ()
    patch: tuple[dict[str, Any], ...] = ()  # dry run: the JSON Patch from the server's Claim


def claim_diff(before: dict[str, Any] | None, after: dict[str, Any], name: str) -> str:
    """A unified diff of two Claims as pretty JSON (keys in their own order)."""
    return "".join(difflib.unified_diff(_lines(before), _lines(after), f"{name} (server)", f"{name} (annotated)"))


def claim_patch(before: dict[str, Any] | None, after: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The JSON Patch (RFC 6902) that turns the server's Claim into the annotated one; for a
    Claim the server does not have, one `add` of the whole document."""
    if before is None:
        return ({"op": "add", "path": "", "value": after},)
    return tuple(jsonpatch.make_patch(before, after).patch)


def _lines(resource: dict[str, Any] | None) -> list[str]:
    if not resource:
        return []
    return jsonio.dumps(resource, option=orjson.OPT_INDENT_2).decode().splitlines(keepends=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    try:
        return metadata.version("g0129-adapter")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def provenance(target: str, claim: AnnotatedClaim, activity: str) -> dict[str, Any]:
    """The one Provenance recipe for every write: the Claim version written, what the decisions
    were made from (version-specific; a review Task a person answered among them), the adapter
    as a Device with its version and the person who answered as verifier, coded activity and
    reason."""
    return {
        "resourceType": "Provenance",
        "meta": {"tag": [dict(ANNOTATED_TAG)]},
        "contained": [
            {
                "resourceType": "Device",
                "id": "adapter",
                "deviceName": [{"name": AGENT, "type": "manufacturer-name"}],
                "version": [{"value": _version()}],
            }
        ],
        "target": [{"reference": target}],
        "recorded": _now(),
        "activity": {"coding": [{"system": _DATA_OPERATION, "code": activity}]},
        "reason": [
            {
                "coding": [{"system": _ACT_REASON, "code": "HPAYMT", "display": "healthcare payment"}],
                "text": "; ".join(f"G0129 decision {d.outcome} for {d.encounter} (ruleset {d.ruleset_version})" for d in claim.decisions),
            }
        ],
        "agent": [
            {
                "type": {"coding": [{"system": _PARTICIPANT_TYPE, "code": "assembler"}]},
                "who": {"reference": "#adapter", "display": AGENT},
            },
            # Whoever answered a review Task the decisions follow (its Task is among the entities).
            *(
                {"type": {"coding": [{"system": _PARTICIPANT_TYPE, "code": "verifier"}]}, "who": who}
                for who in _answerers(claim)
            ),
        ],
        "entity": [{"role": "source", "what": {"reference": ref}} for ref in claim.entities()],
    }


def _answerers(claim: AnnotatedClaim) -> list[dict[str, Any]]:
    people: list[dict[str, Any]] = []
    for case in claim.cases:
        answer = case.review_answer
        if answer is not None and answer.by and answer.by not in people:
            people.append(dict(answer.by))
    return people


def _next_version(version: str | None) -> str | None:
    """The version an update on top of `version` makes. FHIR versionIds are opaque; HAPI and the
    servers we know count 1, 2, 3..., and the response is checked against it (see `write`)."""
    return str(int(version) + 1) if version and version.isdigit() else None


def _version_from(entry: dict[str, Any]) -> tuple[str | None, str | None]:
    """(id, version) from a transaction-response entry's location/etag."""
    response = entry.get("response") or {}
    location = str(response.get("location") or "")
    parts = location.split("/")
    rid = version = None
    if "_history" in parts:
        i = parts.index("_history")
        rid, version = parts[i - 1], parts[i + 1] if i + 1 < len(parts) else None
    elif len(parts) >= 2:
        rid = parts[-1]
    etag = response.get("etag")
    if isinstance(etag, str) and etag:
        version = etag.removeprefix("W/").strip('"')
    return rid, version


class Writer:
    """Writes annotated Claims through `client`. `on_write(claim_id, version, last_modified)` is
    told of every version we create (with the instant the server gave it, when it says), for the
    loop guard; `dry_run` computes and diffs, and writes nothing. `review_owner` (`Type/id`,
    G0129_REVIEW_OWNER) is the owner of the review Tasks written beside the Claims."""

    def __init__(
        self,
        client: FHIRClient,
        on_write: Callable[[str, str, str | None], None] | None = None,
        dry_run: bool = False,
        review_owner: str | None = None,
    ) -> None:
        self.client = client
        self.on_write = on_write
        self.dry_run = dry_run
        self.review_owner = review_owner

    async def write(self, claim: AnnotatedClaim, current: dict[str, Any] | None) -> WriteResult:
        """Write `claim.resource`, made from `current` (the server's version, None when the
        server has no such Claim), in one transaction with its review Task (when it is or was
        under review: adapter/review.py) and its Provenance."""
        annotated = claim.resource
        claim_id = str(annotated.get("id") or "")
        name = f"Claim/{claim_id}"
        decisions = tuple(claim.decisions)
        if current is not None and annotated == current:
            return WriteResult(name, "unchanged", meta_version(current), decisions=decisions)
        if self.dry_run:
            diff, patch = claim_diff(current, annotated, name), claim_patch(current, annotated)
            return WriteResult(name, "dry-run", meta_version(current), diff, decisions, patch)
        expected: str | None
        if current is not None:
            version = meta_version(current)
            request: dict[str, Any] = {"method": "PUT", "url": name}
            if version:
                request["ifMatch"] = f'W/"{version}"'
            claim_entry = {"fullUrl": f"{self.client.base_url}/{name}", "resource": annotated, "request": request}
            expected = _next_version(version)
            target = f"{name}/_history/{expected}" if expected else name
            activity, focus = "UPDATE", name
        elif draft_identifier(annotated):
            # Our draft: created once, whatever the number of runs or workers racing. The server
            # gives it its id, so the Provenance names it by fullUrl and the server resolves it.
            draft = {k: v for k, v in annotated.items() if k != "id"}
            full_url = f"urn:uuid:{uuid.uuid4()}"
            request = {"method": "POST", "url": "Claim", "ifNoneExist": f"identifier={DRAFT_IDENTIFIER_SYSTEM}|{draft_identifier(annotated)}"}
            claim_entry = {"fullUrl": full_url, "resource": draft, "request": request}
            target, activity, expected, focus = full_url, "CREATE", "1", full_url
        else:
            # An EHR claim the server does not have yet (a replay of files): create it under
            # its own id, so the next run updates the same resource.
            claim_entry = {"fullUrl": f"{self.client.base_url}/{name}", "resource": annotated, "request": {"method": "PUT", "url": name}}
            target, activity, expected, focus = f"{name}/_history/1", "CREATE", "1", name
        writes: list[dict[str, Any]] = [claim_entry]
        key = task_key(claim.key, annotated)
        answers = [case.review_answer.rules for case in claim.cases if case.review_answer is not None]
        answered = frozenset().union(*answers) if answers else None
        task = review_task(key, focus, annotated, decisions, claim.cases, under_review(current), answered, self.review_owner, _now())
        if task is not None:
            # A conditional update on the Task's identifier: created the first time, updated after.
            writes.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": task, "request": {"method": "PUT", "url": task_condition(key)}})
        writes.append({"resource": provenance(target, claim, activity), "request": {"method": "POST", "url": "Provenance"}})
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": writes}
        # An If-Match mismatch comes back as 409 (HAPI-0989) or 412; the client raises
        # VersionConflict for both, and `settle` re-reads and re-decides.
        response = await self.client.transaction(bundle)
        entries = response.get("entry") or []
        if not entries:
            raise FatalFHIRError("transaction response has no entries")
        rid, version = _version_from(entries[0])
        status = str((entries[0].get("response") or {}).get("status", ""))
        rid = rid or claim_id
        if version and expected and version != expected and not status.startswith("200"):
            log.warning("%s: the server wrote version %s, the Provenance names %s", name, version, target)
        if self.on_write and rid and version:
            modified = (entries[0].get("response") or {}).get("lastModified")
            await asyncio.to_thread(self.on_write, rid, version, modified if isinstance(modified, str) else None)
        result = "created" if status.startswith("201") else "updated"
        return WriteResult(f"Claim/{rid}", result, version, decisions=decisions)


async def settle(
    writer: Writer,
    decide: Callable[[], Awaitable[RunResult]],
    current_of: Callable[[AnnotatedClaim], dict[str, Any] | None],
    max_conflicts: int = MAX_CONFLICTS,
    on_conflict: Callable[[], None] | None = None,
) -> list[WriteResult]:
    """The one conflict policy: decide from what the server holds now, write each Claim once;
    on 409/412 (someone wrote the Claim meanwhile, a biller's edit) read it and its case again,
    decide again and retry, so that edit is kept. Claims already written come back `unchanged`."""
    for _ in range(max_conflicts):
        run = await decide()
        results: dict[str, WriteResult] = {}
        try:
            for claim in run.claims:
                results[claim.key] = await writer.write(claim, current_of(claim))
        except VersionConflict:
            if on_conflict is not None:
                on_conflict()
            continue
        for error in run.errors:
            if isinstance(error, InvalidResource):  # an annotated Claim we must not write
                raise error
        return list(results.values())
    raise VersionConflict(f"the Claim kept changing under us ({max_conflicts} tries)")


async def push_claims(
    writer: Writer, index: Index, run: RunResult, rules: RuleSet
) -> list[tuple[AnnotatedClaim, list[WriteResult] | FHIRError]]:
    """Write the Claims of an offline run to the server, each decided on top of the server's
    version: its case comes from the files, its Claim from the server (a biller's edits stay).
    One Claim's failure does not stop the others."""
    results: list[tuple[AnnotatedClaim, list[WriteResult] | FHIRError]] = []
    for claim in run.claims:
        encounters = [case.encounter for case in claim.cases]
        server: dict[str, Any] | None = None

        async def decide(claim: AnnotatedClaim = claim, encounters: list[str] = encounters) -> RunResult:
            nonlocal server
            server = await _server_copy(writer.client, claim)
            if server is not None:
                index.replace(Entry(server, f"{writer.client.base_url}/{claim.key}"))
            return await asyncio.to_thread(evaluate, index, rules, "full", encounters)

        try:
            results.append((claim, await settle(writer, decide, lambda _: server)))
        except FHIRError as exc:
            results.append((claim, exc))
        except InvalidResource as exc:
            results.append((claim, FatalFHIRError(str(exc))))
    return results


async def _server_copy(client: FHIRClient, claim: AnnotatedClaim) -> dict[str, Any] | None:
    identifier = draft_identifier(claim.resource)
    if claim.original is None and identifier:
        found = await client.search("Claim", [("identifier", f"{DRAFT_IDENTIFIER_SYSTEM}|{identifier}")])
        return found[0] if found else None
    try:
        return (await client.read("Claim", claim.key.split("/", 1)[1])).resource
    except FatalFHIRError as exc:
        if exc.status in (404, 410):
            return None
        raise
