"""Facts about FHIR shapes that reading and writing both rely on, kept in one place.

Which elements link a Claim to its encounters, what makes a Claim a candidate for G0129, what
marks a line or a Claim as ours, and how versions and references are spelled. The case builder,
the annotator, the server gatherer and the writer import these instead of each knowing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from .ruleset import RuleSet

__all__ = [
    "ADDED_EXTENSION",
    "ANNOTATED_TAG",
    "CORRECTED_EXTENSION",
    "CANONICAL",
    "CLAIM_ENCOUNTER_EXTENSION",
    "DECISION_EXTENSION",
    "DRAFT_IDENTIFIER_SYSTEM",
    "LINE_EXTENSION",
    "LINE_FLAG_EXTENSION",
    "TAG_SYSTEM",
    "OUTCOME_SYSTEM",
    "REVIEW_TASK_PROFILE",
    "RULE_SYSTEM",
    "TASK_CODES",
    "TASK_CODE_SYSTEM",
    "TASK_IDENTIFIER_SYSTEM",
    "CLAIM_STATUSES",
    "COVERAGE_STATUSES",
    "ENCOUNTER_STATUSES",
    "DECISION_RESOURCE_TYPES",
    "SHARED_RESOURCE_TYPES",
    "claim_encounter_references",
    "decision_resource_types",
    "draft_identifier",
    "ehr_view",
    "is_candidate_claim",
    "meta_version",
    "versioned_reference",
]

Resource = dict[str, Any]

CANONICAL: Final = "https://g0129-adapter.org/fhir"
DECISION_EXTENSION: Final = f"{CANONICAL}/StructureDefinition/g0129-decision"
# Marks a Claim.item the adapter added (valueReference: its encounter), so a later decision that
# no longer supports it can take back our own line. Lines the EHR wrote are never removed.
LINE_EXTENSION: Final = f"{CANONICAL}/StructureDefinition/g0129-line"
# Put on a G0129 line the EHR wrote that the decision does not support (no qualifying session
# behind it, or a do-not-bill day): the line is kept for a person to act on, never deleted.
LINE_FLAG_EXTENSION: Final = f"{CANONICAL}/StructureDefinition/g0129-line-flag"
# On a supportingInfo we added (condition code, type of bill): valueReference, the encounter.
ADDED_EXTENSION: Final = f"{CANONICAL}/StructureDefinition/g0129-added"
# On an EHR line whose revenue or units we corrected: what the EHR wrote, so the next decision
# reads the Claim as the EHR wrote it (sub-extensions `revenue`, `quantity`; `absent` names a
# field the EHR had left out).
CORRECTED_EXTENSION: Final = f"{CANONICAL}/StructureDefinition/g0129-corrected"
TAG_SYSTEM: Final = f"{CANONICAL}/CodeSystem/tags"
ANNOTATED_TAG: Final = {"system": TAG_SYSTEM, "code": "annotated", "display": "Annotated by the G0129 adapter"}
DRAFT_IDENTIFIER_SYSTEM: Final = f"{CANONICAL}/NamingSystem/draft-claim"
# The code systems of the decision extension's `rule` and `outcome` codes, published with the
# other definitions (adapter/definitions.py, conformance/).
RULE_SYSTEM: Final = f"{CANONICAL}/CodeSystem/rules"
OUTCOME_SYSTEM: Final = f"{CANONICAL}/CodeSystem/outcomes"
# The review Task: one per Claim under review, found again by its identifier (value: the Claim).
REVIEW_TASK_PROFILE: Final = f"{CANONICAL}/StructureDefinition/g0129-review-task"
TASK_IDENTIFIER_SYSTEM: Final = f"{CANONICAL}/NamingSystem/review-task"
TASK_CODE_SYSTEM: Final = f"{CANONICAL}/CodeSystem/task-codes"
# (code, display, definition): Task.code, the input and output types, and a person's answers.
TASK_CODES: Final = (
    ("review", "Review a G0129 decision", "A person decides whether the proposed G0129 lines are billed."),
    ("finding", "Finding", "Input: a finding of the decision (rule, severity, message, subject)."),
    ("missing-data", "Missing data", "Input: what the rules looked for and did not find."),
    ("proposed-line", "Proposed line", "Input: a G0129 line the decision proposes (code, units, date, revenue code)."),
    ("service-date", "Service date", "Input: the date of the encounter under review."),
    ("payer", "Payer", "Input: the payer billed, as the rules matched it (policy key, then the name on file)."),
    ("answer", "Answer", "Output: the person's answer, approve or reject."),
    ("approve", "Approve", "Answer: bill the proposed lines."),
    ("reject", "Reject", "Answer: do not bill G0129 for this Claim's encounters under review."),
)

# R5 Claim.encounter carried on an R4 Claim header (Da Vinci PAS does this). No R4 search
# parameter covers it: a server search on Claim:encounter only follows item.encounter.
CLAIM_ENCOUNTER_EXTENSION: Final = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Claim.encounter"

_INACTIVE_CLAIM: Final = ("cancelled", "entered-in-error")

# FHIR R4 required value sets of the status elements the rules read (a shape of FHIR, not a
# billing fact): any other value is an input error.
ENCOUNTER_STATUSES: Final = frozenset(
    ("planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled", "entered-in-error", "unknown")
)
COVERAGE_STATUSES: Final = frozenset(("active", "cancelled", "draft", "entered-in-error"))
CLAIM_STATUSES: Final = COVERAGE_STATUSES  # both bind to fm-status

# Every resource type a decision reads (case.py), besides the documentation evidence the rule
# tables name: a Bulk Data export for replay asks for these and no others (`_type`).
DECISION_RESOURCE_TYPES: Final = (
    "Patient", "Encounter", "EpisodeOfCare", "Procedure", "Condition", "Claim", "Coverage",
    "Organization", "Practitioner", "PractitionerRole",
    # A biller's answer to a review Task of ours is part of the case (adapter/review.py).
    "Task",
)
# Those outside the R4 Patient compartment (Task too, whose `for` is no compartment link in R4):
# a Patient- or Group-level export leaves them out (HAPI refuses the kick-off if asked), so they
# come from a system-level export of their own.
SHARED_RESOURCE_TYPES: Final = ("Organization", "Practitioner", "PractitionerRole", "Task")


def decision_resource_types(rules: RuleSet) -> tuple[str, ...]:
    """DECISION_RESOURCE_TYPES and the documentation evidence types of `rules`, sorted."""
    evidence = {ev.resource_type for el in rules.documentation for ev in el.evidence if ev.kind == "resource"}
    return tuple(sorted({*DECISION_RESOURCE_TYPES, *evidence}))


def claim_encounter_references(claim: Resource) -> Iterator[Any]:
    """Every Reference by which a Claim says which encounter it bills.

    `item.encounter` (R4), the R5 cross-version extension on the header, and for a draft we made,
    its identifier (a draft for a day we do not bill has no item to carry `item.encounter`).
    """
    for ext in claim.get("extension") or ():
        if isinstance(ext, dict) and ext.get("url") == CLAIM_ENCOUNTER_EXTENSION:
            yield ext.get("valueReference")
    for item in claim.get("item") or ():
        if isinstance(item, dict):
            yield from item.get("encounter") or ()
    draft = draft_identifier(claim)
    if draft:
        yield {"reference": draft}


def draft_identifier(claim: Resource) -> str | None:
    """The encounter (`Encounter/<id>`) a draft Claim of ours was made for, or None."""
    for ident in claim.get("identifier") or ():
        if isinstance(ident, dict) and ident.get("system") == DRAFT_IDENTIFIER_SYSTEM:
            value = ident.get("value")
            return value if isinstance(value, str) else None
    return None


def is_candidate_claim(claim: Resource, rules: RuleSet) -> bool:
    """Whether G0129 may be written on this Claim: an institutional claim (UB-04/837I) with
    `use = claim`, not cancelled. Pharmacy, professional, oral and vision Claims never are."""
    if claim.get("use") != "claim" or claim.get("status") in _INACTIVE_CLAIM:
        return False
    claim_type = claim.get("type")
    codings = claim_type.get("coding") if isinstance(claim_type, dict) else None
    for c in codings or ():  # a loop, not any(): this is asked of every Claim of every case
        if isinstance(c, dict) and rules.system_key(c.get("system")) == "claim_type" and c.get("code") == "institutional":
            return True
    return False


def _marked(element: Any, url: str) -> bool:
    extensions = element.get("extension") if isinstance(element, dict) else None
    # Most elements have no extension: asked of every line of every Claim read.
    return any(isinstance(e, dict) and e.get("url") == url for e in extensions) if extensions else False


def ehr_view(claim: Resource) -> Resource:
    """The Claim as the EHR wrote it: our lines, our supportingInfo and our decision gone, the
    values we corrected put back. Decisions are made from this view, so writing a decision
    never changes the next one (annotating is idempotent, deciding on our own output is too)."""
    out = dict(claim)
    items = []
    for item in claim.get("item") or ():
        if _marked(item, LINE_EXTENSION):
            continue
        if isinstance(item, dict) and item.get("extension"):
            item = dict(item)
            for ext in item.get("extension") or ():
                if isinstance(ext, dict) and ext.get("url") == CORRECTED_EXTENSION:
                    for part in ext.get("extension") or ():
                        if part.get("url") == "revenue":
                            item["revenue"] = part.get("valueCodeableConcept")
                        elif part.get("url") == "quantity":
                            item["quantity"] = part.get("valueQuantity")
                        elif part.get("url") == "absent":
                            item.pop(str(part.get("valueCode")), None)
            rest = [e for e in item["extension"] if not (isinstance(e, dict) and e.get("url") in (CORRECTED_EXTENSION, LINE_FLAG_EXTENSION))]
            if rest:
                item["extension"] = rest
            else:
                del item["extension"]
        items.append(item)
    if items:
        out["item"] = items
    else:
        out.pop("item", None)
    infos = [i for i in claim.get("supportingInfo") or () if not _marked(i, ADDED_EXTENSION)]
    if infos:
        out["supportingInfo"] = infos
    else:
        out.pop("supportingInfo", None)
    return out


def meta_version(resource: Resource | None) -> str | None:
    meta = (resource or {}).get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return str(version) if version else None


def versioned_reference(resource: Resource) -> str:
    """`Type/id/_history/n`, or `Type/id` for a resource that carries no version."""
    ref = f"{resource.get('resourceType')}/{resource.get('id')}"
    version = meta_version(resource)
    return f"{ref}/_history/{version}" if version else ref
