"""Fetch one encounter's case from a FHIR server in few round trips.

Round 1 is one search on the Encounter with `_include`/`_revinclude` (sessions, claims,
performers, encounter-linked documentation). Round 2 is one `batch` of patient-wide searches
(coverages with their payors, our draft claim, conditions, patient-linked documentation). The
results go into the same Index the offline replay uses, so the server path and the file path
decide identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .vocabulary import DRAFT_IDENTIFIER_SYSTEM
from .case import Case, build_cases
from .vocabulary import CLAIM_ENCOUNTER_EXTENSION
from .errors import FatalFHIRError
from .fhir_client import FHIRClient
from .ingest import Index, load_value
from .notifications import Change, split_reference
from .ruleset import RuleSet

__all__ = ["encounters_touched", "gather_case"]

PAGE = "200"


async def encounters_touched(client: FHIRClient, change: Change) -> list[str]:
    """Ids of the Encounters a changed Encounter, Procedure or Claim bears on."""
    if change.resource_type == "Encounter":
        return [change.resource_id]
    if change.resource_type not in ("Procedure", "Claim"):
        return []
    resource = change.resource
    if resource is None:
        resource = (await client.read(change.resource_type, change.resource_id)).resource or {}
    refs: list[Any] = []
    if change.resource_type == "Procedure":
        refs.append(resource.get("encounter"))
    else:
        refs.extend(
            e.get("valueReference") for e in resource.get("extension") or () if isinstance(e, dict) and e.get("url") == CLAIM_ENCOUNTER_EXTENSION
        )
        for item in resource.get("item") or ():
            if isinstance(item, dict):
                refs.extend(item.get("encounter") or ())
    ids = []
    for ref in refs:
        parts = split_reference(ref.get("reference", "")) if isinstance(ref, dict) else None
        if parts and parts[0] == "Encounter" and parts[1] not in ids:
            ids.append(parts[1])
    return ids


def _add(index: Index, bundle: dict[str, Any], source: str) -> None:
    entries, _ = load_value(bundle, source)
    for entry in entries:
        index.add(entry)


def _documentation_types(rules: RuleSet, link: str) -> list[str]:
    return sorted({ev.resource_type for el in rules.documentation for ev in el.evidence if ev.kind == "resource" and ev.link == link})


async def gather_case(
    client: FHIRClient, encounter_id: str, rules: RuleSet, extra: Sequence[dict[str, Any]] = ()
) -> tuple[Case | None, Index]:
    """The Case of one encounter as the server has it now (None if it is not a G0129 case).

    `extra` are resources already in hand (the Claim a notification carried, which may link to
    its encounter only by the R5 extension that no search parameter covers).
    """
    index = Index()
    params: list[tuple[str, str]] = [
        ("_id", encounter_id),
        ("_include", "Encounter:subject"),
        ("_include", "Encounter:episode-of-care"),
        ("_include", "Encounter:diagnosis"),
        ("_include", "Encounter:service-provider"),
        ("_revinclude", "Procedure:encounter"),
        ("_revinclude", "Claim:encounter"),
        ("_include:iterate", "Procedure:performer"),
        ("_include:iterate", "PractitionerRole:practitioner"),
    ]
    params += [("_revinclude", f"{t}:encounter") for t in _documentation_types(rules, "encounter")]
    params.append(("_count", PAGE))
    entries = await client.search_entries("Encounter", params)
    _add(index, {"resourceType": "Bundle", "type": "searchset", "entry": entries}, f"{client.base_url}/Encounter?_id={encounter_id}")
    encounter = index.by_key.get(f"Encounter/{encounter_id}")
    if encounter is None:
        return None, index
    for resource in extra:
        _add(index, resource, "notification")

    subject = encounter.resource.get("subject")
    patient = split_reference(subject.get("reference", "")) if isinstance(subject, dict) else None
    searches = [f"Claim?identifier={DRAFT_IDENTIFIER_SYSTEM}|Encounter/{encounter_id}"]
    if patient:
        pid = f"{patient[0]}/{patient[1]}"
        searches += [f"Coverage?beneficiary={pid}&_include=Coverage:payor&_count={PAGE}", f"Condition?patient={pid}&_count={PAGE}"]
        searches += [f"{t}?patient={pid}&_count={PAGE}" for t in _documentation_types(rules, "patient")]
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": url}} for url in searches],
    }
    response = await client.batch(batch)
    for n, entry in enumerate(response.get("entry") or ()):
        status = str((entry.get("response") or {}).get("status", ""))
        if not status.startswith("2"):
            raise FatalFHIRError(f"batch search {searches[n]} answered {status}")
        if isinstance(entry.get("resource"), dict):
            _add(index, entry["resource"], f"{client.base_url}/{searches[n]}")

    for case in build_cases(index, rules):
        if case.encounter == f"Encounter/{encounter_id}":
            return case, index
    return None, index
