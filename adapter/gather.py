"""Fetch what deciding some encounters needs from a FHIR server, in few round trips.

Round 1 is one search on the Encounters with `_include`/`_revinclude` (sessions, claims,
performers, encounter-linked documentation). Round 2 is one `batch` of patient-wide searches
(coverages with their payors, our draft claims, conditions, the patient's Claims,
patient-linked documentation). When a Claim found bills other days, those encounters follow in
another round. The results go into the same Index the offline replay uses, and the same
`pipeline.evaluate` decides them, so the server path and the file path decide identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import FatalFHIRError
from .fhir_client import FHIRClient
from .ingest import Entry, Index, load_value
from .notifications import Change, split_reference
from .ruleset import RuleSet
from .vocabulary import DRAFT_IDENTIFIER_SYSTEM, TASK_CODE_SYSTEM, claim_encounter_references, is_candidate_claim

__all__ = ["encounters_touched", "gather", "patients_of"]

PAGE = "200"
# Rounds of following a Claim to the other days it bills; a PHP claim covers days of one patient.
MAX_ROUNDS = 3


async def encounters_touched(client: FHIRClient, change: Change, rules: RuleSet) -> list[str]:
    """Ids of the Encounters a changed Encounter, Procedure, Claim or review Task bears on."""
    if change.resource_type == "Encounter":
        return [change.resource_id]
    if change.resource_type not in ("Procedure", "Claim", "Task"):
        return []
    resource = change.resource
    if resource is None:
        resource = (await client.read(change.resource_type, change.resource_id)).resource or {}
    refs: list[Any] = []
    if change.resource_type == "Task":
        # A person answered a review Task: its Claim (and so every day it bills) is decided again.
        focus = resource.get("focus")
        parts = split_reference(focus.get("reference", "")) if isinstance(focus, dict) else None
        if parts and parts[0] == "Claim":
            claim = (await client.read("Claim", parts[1])).resource or {}
            return await encounters_touched(client, Change("Claim", parts[1], "", claim), rules)
        return []
    if change.resource_type == "Procedure":
        refs.append(resource.get("encounter"))
    elif is_candidate_claim(resource, rules):  # a pharmacy or professional Claim is never ours to annotate
        refs.extend(claim_encounter_references(resource))
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


async def gather(client: FHIRClient, encounter_ids: Sequence[str], rules: RuleSet, extra: Sequence[dict[str, Any]] = ()) -> Index:
    """Everything needed to decide these encounters and every Claim that bills them, as the
    server has it now.

    A Claim found for an encounter may bill other days too (a PHP claim often covers a week):
    those encounters are gathered as well, so the Claim is decided, and written, as a whole.
    `extra` are resources already in hand (the Claim a notification carried).
    """
    index = Index()
    gathered: set[str] = set()
    patients: set[str] = set()
    wanted = list(dict.fromkeys(encounter_ids))
    for _ in range(MAX_ROUNDS):
        ids = [i for i in wanted if i not in gathered]
        if not ids:
            break
        await _encounters(client, index, ids, rules)
        gathered.update(ids)
        new_patients = sorted({p for p in (_patient_of(index, i) for i in ids) if p} - patients)
        patients.update(new_patients)
        await _patient_searches(client, index, new_patients, ids, rules)
        # Follow the candidate Claims of what we have to the other encounters they bill.
        for claim in index.of_type("Claim"):
            if not is_candidate_claim(claim.resource, rules):
                continue
            linked = [i for i in (_encounter_id(index, ref, claim) for ref in claim_encounter_references(claim.resource)) if i]
            if gathered.intersection(linked):
                wanted.extend(i for i in linked if i not in wanted)
    # Last: what the server says now wins a tie with a copy a notification carried.
    for resource in extra:
        _add(index, resource, "notification")
    await _missing_payors(client, index)
    return index


async def _missing_payors(client: FHIRClient, index: Index) -> None:
    """The payor Organizations no search brought: those of a Coverage contained in its Claim
    (Cigna sends them so), which `_include=Coverage:payor` cannot reach."""
    wanted: set[str] = set()
    for claim in index.of_type("Claim"):
        for contained in claim.resource.get("contained") or ():
            if isinstance(contained, dict) and contained.get("resourceType") == "Coverage":
                for ref in contained.get("payor") or ():
                    parts = split_reference(ref.get("reference", "")) if isinstance(ref, dict) else None
                    if parts and parts[0] == "Organization" and index.resolve(ref, claim) is None:
                        wanted.add(f"Organization/{parts[1]}")
    if not wanted:
        return
    reads = sorted(wanted)
    response = await client.batch(
        {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": url}} for url in reads]}
    )
    for n, entry in enumerate(response.get("entry") or ()):
        if isinstance(entry.get("resource"), dict) and str((entry.get("response") or {}).get("status", "")).startswith("2"):
            _add(index, entry["resource"], f"{client.base_url}/{reads[n]}")


async def _encounters(client: FHIRClient, index: Index, ids: Sequence[str], rules: RuleSet) -> None:
    """Round 1: the encounters with their sessions, Claims (item.encounter), performers,
    episodes, diagnoses and encounter-linked documentation, in one search."""
    params: list[tuple[str, str]] = [
        ("_id", ",".join(ids)),
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
    _add(index, {"resourceType": "Bundle", "type": "searchset", "entry": entries}, f"{client.base_url}/Encounter?_id={','.join(ids)}")


async def _patient_searches(client: FHIRClient, index: Index, patients: Sequence[str], ids: Sequence[str], rules: RuleSet) -> None:
    """Round 2, one batch: our drafts by identifier, and per patient the coverages with their
    payors, conditions, patient-linked documentation and the Claims. A Claim that names its
    encounter only in the R5 extension is found among the patient's Claims: no R4 search
    parameter covers that extension, so a server cannot be asked for it directly."""
    searches = [f"Claim?identifier={DRAFT_IDENTIFIER_SYSTEM}|Encounter/{i}" for i in ids]
    for pid in patients:
        searches += [
            f"Coverage?beneficiary={pid}&_include=Coverage:payor&_count={PAGE}",
            f"Condition?patient={pid}&_count={PAGE}",
            # Newest first: the Claims of the service period lead the first page.
            f"Claim?patient={pid}&_sort=-created&_count={PAGE}",
            # The review Tasks of the patient's Claims: a person's answer is part of the case.
            f"Task?patient={pid}&code={TASK_CODE_SYSTEM}|review&_count={PAGE}",
        ]
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


def patients_of(index: Index, encounter_ids: Sequence[str]) -> set[str]:
    """Whose Claims deciding these encounters may write: their patients (`Patient/x`); an
    encounter that names none stands for itself (`Encounter/x`)."""
    return {_patient_of(index, i) or f"Encounter/{i}" for i in encounter_ids}


def _patient_of(index: Index, encounter_id: str) -> str | None:
    encounter = index.get(f"Encounter/{encounter_id}")
    subject = encounter.resource.get("subject") if encounter else None
    parts = split_reference(subject.get("reference", "")) if isinstance(subject, dict) else None
    return f"{parts[0]}/{parts[1]}" if parts and parts[0] == "Patient" else None


def _encounter_id(index: Index, reference: Any, context: Entry) -> str | None:
    hit = index.resolve_entry(reference, context)
    if isinstance(hit, Entry):
        return hit.id if hit.type == "Encounter" else None
    parts = split_reference(reference.get("reference", "")) if isinstance(reference, dict) else None
    return parts[1] if parts and parts[0] == "Encounter" else None
