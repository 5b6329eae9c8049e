"""Write an annotated Claim to a FHIR server: never twice, never over a biller's edit.

- An existing Claim is replaced with `PUT` + `If-Match` on the version the decision was made
  from; a 409/412 raises VersionConflict so the caller re-reads, re-decides and tries again.
- A draft (no Claim yet) is created with `If-None-Exist` on its deterministic identifier.
- Each write goes in one transaction with the Provenance that explains it.
- Nothing is written when the annotated Claim equals the server's (annotation is idempotent),
  so a re-run, a duplicate notification or our own write's echo changes nothing.
- The versions we write are recorded, so the notification about them is recognised as ours.
"""

from __future__ import annotations

import asyncio
import difflib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from .annotate import annotate
from .vocabulary import ANNOTATED_TAG, DRAFT_IDENTIFIER_SYSTEM
from .decision import Decision
from .errors import FatalFHIRError, FHIRError, VersionConflict
from .fhir_client import FHIRClient
from .pipeline import AnnotatedClaim
from .ruleset import RuleSet

__all__ = ["WriteResult", "Writer", "claim_diff", "push_claims"]

AGENT = "G0129 billing adapter"


@dataclass(frozen=True, slots=True)
class WriteResult:
    claim: str  # Claim/<id>
    result: str  # created | updated | unchanged | dry-run
    version: str | None = None
    diff: str = ""


def claim_diff(before: dict[str, Any] | None, after: dict[str, Any], name: str) -> str:
    """A unified diff of two Claims as pretty JSON (keys in their own order)."""
    return "".join(difflib.unified_diff(_lines(before), _lines(after), f"{name} (server)", f"{name} (annotated)"))


def _lines(resource: dict[str, Any] | None) -> list[str]:
    if not resource:
        return []
    return orjson.dumps(resource, option=orjson.OPT_INDENT_2).decode().splitlines(keepends=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _provenance(target: str, decisions: Sequence[Decision], entities: Sequence[str], activity: str) -> dict[str, Any]:
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "meta": {"tag": [dict(ANNOTATED_TAG)]},
        "target": [{"reference": target}],
        "recorded": _now(),
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": activity}]},
        "agent": [
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "assembler"}]},
                "who": {"display": AGENT},
            }
        ],
        "reason": [{"text": f"G0129 decision {d.outcome} for {d.encounter} (ruleset {d.ruleset_version})"} for d in decisions],
    }
    if entities:
        provenance["entity"] = [{"role": "source", "what": {"reference": ref}} for ref in entities]
    return provenance


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
    """Writes annotated Claims through `client`. `on_write(claim_id, version)` is told of every
    version we create, for the loop guard; `dry_run` computes and diffs, and writes nothing."""

    def __init__(self, client: FHIRClient, on_write: Callable[[str, str], None] | None = None, dry_run: bool = False) -> None:
        self.client = client
        self.on_write = on_write
        self.dry_run = dry_run

    async def write(
        self,
        annotated: dict[str, Any],
        current: dict[str, Any] | None,
        decisions: Sequence[Decision],
        entities: Sequence[str] = (),
    ) -> WriteResult:
        """Write `annotated`, made from `current` (the server's version, None for a new claim)."""
        claim_id = str(annotated.get("id") or "")
        name = f"Claim/{claim_id}"
        if current is not None and annotated == current:
            return WriteResult(name, "unchanged", _meta_version(current))
        if self.dry_run:
            return WriteResult(name, "dry-run", _meta_version(current) if current else None, claim_diff(current, annotated, name))
        if current is not None:
            version = _meta_version(current)
            request: dict[str, Any] = {"method": "PUT", "url": name}
            if version:
                request["ifMatch"] = f'W/"{version}"'
            claim_entry = {"fullUrl": f"{self.client.base_url}/{name}", "resource": annotated, "request": request}
            target, activity = name, "UPDATE"
        elif _draft_identifier(annotated):
            # Our draft: created once, whatever the number of runs or workers racing.
            draft = {k: v for k, v in annotated.items() if k != "id"}
            full_url = f"urn:uuid:{uuid.uuid4()}"
            request = {"method": "POST", "url": "Claim", "ifNoneExist": f"identifier={DRAFT_IDENTIFIER_SYSTEM}|{_draft_identifier(annotated)}"}
            claim_entry = {"fullUrl": full_url, "resource": draft, "request": request}
            target, activity = full_url, "CREATE"
        else:
            # An EHR claim the server does not have yet (a replay of files): create it under
            # its own id, so the next run updates the same resource.
            claim_entry = {"fullUrl": f"{self.client.base_url}/{name}", "resource": annotated, "request": {"method": "PUT", "url": name}}
            target, activity = name, "CREATE"
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                claim_entry,
                {"resource": _provenance(target, decisions, entities, activity), "request": {"method": "POST", "url": "Provenance"}},
            ],
        }
        # An If-Match mismatch comes back as 409 (HAPI-0989) or 412; the client raises
        # VersionConflict for both, and the caller re-reads and re-decides.
        response = await self.client.transaction(bundle)
        entries = response.get("entry") or []
        if not entries:
            raise FatalFHIRError("transaction response has no entries")
        rid, version = _version_from(entries[0])
        status = str((entries[0].get("response") or {}).get("status", ""))
        rid = rid or claim_id
        if self.on_write and rid and version:
            await asyncio.to_thread(self.on_write, rid, version)
        result = "created" if status.startswith("201") else "updated"
        return WriteResult(f"Claim/{rid}", result, version)


def _draft_identifier(claim: dict[str, Any]) -> str | None:
    return next(
        (i.get("value") for i in claim.get("identifier") or () if isinstance(i, dict) and i.get("system") == DRAFT_IDENTIFIER_SYSTEM),
        None,
    )


async def push_claims(
    writer: Writer, claims: Sequence[AnnotatedClaim], rules: RuleSet, max_conflicts: int = 3
) -> list[tuple[AnnotatedClaim, WriteResult | FHIRError]]:
    """Write the Claims of an offline run to the server, each on top of the server's version.

    The decisions are re-applied to what the server holds now (a biller's edits stay); a
    version conflict re-reads and tries again. One claim's failure does not stop the others.
    """
    results: list[tuple[AnnotatedClaim, WriteResult | FHIRError]] = []
    for claim in claims:
        outcome: WriteResult | FHIRError
        try:
            for _ in range(max_conflicts):
                current = await _server_copy(writer.client, claim)
                annotated = claim.resource
                if current is not None:
                    annotated = current
                    for decision in claim.decisions:
                        annotated = annotate(annotated, decision, rules)
                try:
                    outcome = await writer.write(annotated, current, claim.decisions, [d.encounter for d in claim.decisions])
                    break
                except VersionConflict as exc:
                    outcome = exc
        except FHIRError as exc:
            outcome = exc
        results.append((claim, outcome))
    return results


async def _server_copy(client: FHIRClient, claim: AnnotatedClaim) -> dict[str, Any] | None:
    identifier = _draft_identifier(claim.resource)
    if claim.original is None and identifier:
        found = await client.search("Claim", [("identifier", f"{DRAFT_IDENTIFIER_SYSTEM}|{identifier}")])
        return found[0] if found else None
    try:
        return (await client.read("Claim", claim.key.split("/", 1)[1])).resource
    except FatalFHIRError as exc:
        if exc.status in (404, 410):
            return None
        raise


def _meta_version(resource: dict[str, Any] | None) -> str | None:
    meta = (resource or {}).get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return str(version) if version else None
