"""The published definitions of what the adapter writes, made from the code's own vocabulary
and the rule tables: StructureDefinitions for our extensions and for the review Task, and a
CodeSystem (with its all-codes ValueSet) for rule ids, outcomes, tags and Task codes.

Pure: `definitions(rules)` returns the resources; `python3 -m tests.conformance` writes them to
`adapter/conformance/` (shipped in the package; `conformance/` at the repository root points
there) and `tests/test_conformance.py` requires the committed files to be exactly these, so a
rule id lives in `rules.yaml` only. A FHIR server that loads them validates what we write (the
end-to-end tests load them into HAPI and `$validate` every Claim, Task and Provenance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .decision import OUTCOMES
from .ruleset import RuleSet
from .vocabulary import (
    ADDED_EXTENSION,
    ANNOTATED_TAG,
    CANONICAL,
    CORRECTED_EXTENSION,
    DECISION_EXTENSION,
    LINE_EXTENSION,
    LINE_FLAG_EXTENSION,
    OUTCOME_SYSTEM,
    REVIEW_TASK_PROFILE,
    RULE_SYSTEM,
    TAG_SYSTEM,
    TASK_CODES,
    TASK_CODE_SYSTEM,
)

__all__ = ["definitions"]

Resource = dict[str, Any]

_FHIR = "http://hl7.org/fhir/StructureDefinition"
_PUBLISHER = "G0129 billing adapter"

_OUTCOME_DEFINITIONS = {
    "bill": "Bill G0129: no finding asks for review or stops the line; the lines are on the Claim.",
    "review": "A person must look before G0129 is billed; the proposed lines wait in the decision extension.",
    "do-not-bill": "G0129 must not be billed for this encounter; the EHR's G0129 lines are flagged, never deleted.",
}


@dataclass(frozen=True, slots=True)
class _Part:
    """One sub-extension of a complex extension: its url, value type(s) and cardinality."""

    name: str
    short: str
    value: str = ""  # FHIR type of value[x]; empty for a complex part
    min: int = 0
    max: str = "1"
    target: str = ""  # Reference target resource type
    binding: str = ""  # required ValueSet
    parts: tuple[_Part, ...] = field(default=())


def _value_type(part: _Part) -> Resource:
    typ: Resource = {"code": part.value}
    if part.target:
        typ["targetProfile"] = [f"{_FHIR}/{part.target}"]
    return typ


def _extension_elements(prefix: str, path: str, url: str, part: _Part) -> list[Resource]:
    """The differential of one extension (itself, its sub-extensions, url, value[x])."""
    elements: list[Resource] = []
    if part.parts:
        elements.append(
            {
                "id": f"{prefix}.extension",
                "path": f"{path}.extension",
                "slicing": {"discriminator": [{"type": "value", "path": "url"}], "rules": "open"},
            }
        )
        for sub in part.parts:
            sub_prefix = f"{prefix}.extension:{sub.name}"
            elements.append(
                {"id": sub_prefix, "path": f"{path}.extension", "sliceName": sub.name, "short": sub.short, "min": sub.min, "max": sub.max}
            )
            elements += _extension_elements(sub_prefix, f"{path}.extension", sub.name, sub)
    else:
        elements.append({"id": f"{prefix}.extension", "path": f"{path}.extension", "max": "0"})
    elements.append({"id": f"{prefix}.url", "path": f"{path}.url", "fixedUri": url})
    if part.parts:
        elements.append({"id": f"{prefix}.value[x]", "path": f"{path}.value[x]", "max": "0"})
    else:
        value: Resource = {"id": f"{prefix}.value[x]", "path": f"{path}.value[x]", "min": 1, "type": [_value_type(part)]}
        if part.binding:
            value["binding"] = {"strength": "required", "valueSet": part.binding}
        elements.append(value)
    return elements


def _name(sd_id: str) -> str:
    return "".join(word.capitalize() for word in sd_id.split("-"))


def _extension(url: str, title: str, description: str, context: str, part: _Part, version: str) -> Resource:
    sd_id = url.rsplit("/", 1)[1]
    root: Resource = {"id": "Extension", "path": "Extension", "short": title, "definition": description}
    return {
        "resourceType": "StructureDefinition",
        "id": sd_id,
        "url": url,
        "version": version,
        "name": _name(sd_id),
        "title": title,
        "status": "active",
        "publisher": _PUBLISHER,
        "description": description,
        "fhirVersion": "4.0.1",
        "kind": "complex-type",
        "abstract": False,
        "context": [{"type": "element", "expression": context}],
        "type": "Extension",
        "baseDefinition": f"{_FHIR}/Extension",
        "derivation": "constraint",
        "differential": {"element": [root, *_extension_elements("Extension", "Extension", url, part)]},
    }


def _value_set_url(system: str) -> str:
    return system.replace("/CodeSystem/", "/ValueSet/")


def _code_system(url: str, title: str, description: str, concepts: list[Resource], version: str) -> list[Resource]:
    """A complete CodeSystem and the ValueSet of all its codes (bindings name a ValueSet)."""
    cs_id = url.rsplit("/", 1)[1]
    value_set = _value_set_url(url)
    return [
        {
            "resourceType": "CodeSystem",
            "id": cs_id,
            "url": url,
            "version": version,
            "name": _name(f"g0129-{cs_id}"),
            "title": title,
            "status": "active",
            "publisher": _PUBLISHER,
            "description": description,
            "caseSensitive": True,
            "valueSet": value_set,
            "content": "complete",
            "count": len(concepts),
            "concept": concepts,
        },
        {
            "resourceType": "ValueSet",
            "id": cs_id,
            "url": value_set,
            "version": version,
            "name": _name(f"g0129-{cs_id}"),
            "title": f"{title} (all codes)",
            "status": "active",
            "publisher": _PUBLISHER,
            "description": f"Every code of {url}.",
            "compose": {"include": [{"system": url}]},
        },
    ]


def _decision_parts() -> _Part:
    proposed = (
        _Part("code", "The code to bill (HCPCS G0129)", "Coding", min=1),
        _Part("units", "Sessions of the minimum length or more that date", "positiveInt", min=1),
        _Part("serviceDate", "The date of service", "date", min=1),
        _Part("revenueCode", "The NUBC revenue code of the line", "Coding", min=1),
        _Part("modifier", "A HCPCS modifier of the line", "Coding", max="*"),
        _Part("procedure", "An OT session the line counts", "Reference", max="*", target="Procedure"),
    )
    return _Part(
        "decision",
        "The G0129 decision for one encounter",
        parts=(
            _Part("outcome", "bill | review | do-not-bill", "code", min=1, binding=_value_set_url(OUTCOME_SYSTEM)),
            _Part("rule", "A rule with a finding", "code", max="*", binding=_value_set_url(RULE_SYSTEM)),
            _Part("rulesetVersion", "The rule tables the decision was made with", "string", min=1),
            _Part("encounter", "The encounter decided", "Reference", min=1, target="Encounter"),
            _Part("proposedLine", "A line proposed for a person's review (outcome review only)", max="*", parts=proposed),
        ),
    )


def _extensions(version: str) -> list[Resource]:
    return [
        _extension(
            DECISION_EXTENSION,
            "G0129 decision",
            "The G0129 decision for one encounter the Claim bills: outcome, the rules with a finding, the "
            "ruleset version and, when a person must review, the lines proposed.",
            "Claim",
            _decision_parts(),
            version,
        ),
        _extension(
            LINE_EXTENSION,
            "G0129 line added by the adapter",
            "Marks a Claim.item the adapter added, naming the encounter it bills, so a later decision that "
            "no longer supports it takes back only the adapter's own line.",
            "Claim.item",
            _Part("line", "The encounter the line bills", "Reference", min=1, target="Encounter"),
            version,
        ),
        _extension(
            LINE_FLAG_EXTENSION,
            "G0129 line flagged",
            "On a G0129 line the EHR wrote that the decision does not support: kept for a person, never deleted.",
            "Claim.item",
            _Part(
                "line-flag",
                "Why the line is flagged",
                parts=(
                    _Part("reason", "unsupported | do-not-bill", "code", min=1),
                    _Part("encounter", "The encounter whose decision flagged it", "Reference", min=1, target="Encounter"),
                ),
            ),
            version,
        ),
        _extension(
            ADDED_EXTENSION,
            "Supporting information added by the adapter",
            "On a Claim.supportingInfo the adapter added (condition code, type of bill), naming the encounter.",
            "Claim.supportingInfo",
            _Part("added", "The encounter it was added for", "Reference", min=1, target="Encounter"),
            version,
        ),
        _extension(
            CORRECTED_EXTENSION,
            "What the EHR wrote on a line the adapter corrected",
            "On an EHR line whose revenue code or units the adapter corrected: the EHR's values, so the next "
            "decision reads the Claim as the EHR wrote it (`absent` names a field the EHR had left out).",
            "Claim.item",
            _Part(
                "corrected",
                "The EHR's values",
                parts=(
                    _Part("revenue", "The EHR's revenue code", "CodeableConcept"),
                    _Part("quantity", "The EHR's quantity", "Quantity"),
                    _Part("absent", "A field the EHR had left out", "code", max="*"),
                ),
            ),
            version,
        ),
    ]


def _review_task(version: str) -> Resource:
    review = next(c for c in TASK_CODES if c[0] == "review")
    sd_id = REVIEW_TASK_PROFILE.rsplit("/", 1)[1]
    task_codes = _value_set_url(TASK_CODE_SYSTEM)
    return {
        "resourceType": "StructureDefinition",
        "id": sd_id,
        "url": REVIEW_TASK_PROFILE,
        "version": version,
        "name": _name(sd_id),
        "title": "G0129 review Task",
        "status": "active",
        "publisher": _PUBLISHER,
        "description": "A person's review of a G0129 decision: one Task per Claim under review, focused on the "
        "Claim, for its Patient, with the rules that asked for review, the findings, the missing data and the "
        "proposed lines as input; a person completes it with an output `answer` of approve or reject.",
        "fhirVersion": "4.0.1",
        "kind": "resource",
        "abstract": False,
        "type": "Task",
        "baseDefinition": f"{_FHIR}/Task",
        "derivation": "constraint",
        "differential": {
            "element": [
                {"id": "Task", "path": "Task"},
                {"id": "Task.identifier", "path": "Task.identifier", "short": "One Task per Claim", "min": 1},
                {
                    "id": "Task.code",
                    "path": "Task.code",
                    "min": 1,
                    "patternCodeableConcept": {"coding": [{"system": TASK_CODE_SYSTEM, "code": review[0]}]},
                },
                {
                    "id": "Task.focus",
                    "path": "Task.focus",
                    "short": "The Claim under review",
                    "min": 1,
                    "type": [{"code": "Reference", "targetProfile": [f"{_FHIR}/Claim"]}],
                },
                {
                    "id": "Task.for",
                    "path": "Task.for",
                    "min": 1,
                    "type": [{"code": "Reference", "targetProfile": [f"{_FHIR}/Patient"]}],
                },
                {
                    "id": "Task.reasonCode",
                    "path": "Task.reasonCode",
                    "short": "The rules that asked for review",
                    "binding": {"strength": "extensible", "valueSet": _value_set_url(RULE_SYSTEM)},
                },
                {"id": "Task.input.type", "path": "Task.input.type", "binding": {"strength": "extensible", "valueSet": task_codes}},
                {"id": "Task.output.type", "path": "Task.output.type", "binding": {"strength": "extensible", "valueSet": task_codes}},
            ]
        },
    }


def definitions(rules: RuleSet) -> dict[str, Resource]:
    """Every published definition, by file name (`<resourceType>-<id>.json`)."""
    version = rules.version.split("+", 1)[0]  # the catalog's version, not the tables' digest
    rule_concepts = [{"code": r.id, "display": r.id, "definition": r.checks} for r in rules.rules]
    outcome_concepts = [{"code": o, "display": o, "definition": _OUTCOME_DEFINITIONS[o]} for o in OUTCOMES]
    tag_concepts = [{"code": ANNOTATED_TAG["code"], "display": ANNOTATED_TAG["display"], "definition": "The Claim carries G0129 decisions written by the adapter."}]
    task_concepts = [{"code": code, "display": display, "definition": definition} for code, display, definition in TASK_CODES]
    resources = [
        *_extensions(version),
        _review_task(version),
        *_code_system(RULE_SYSTEM, "G0129 rules", "The rules of the G0129 catalog (rules.yaml), each with what it checks.", rule_concepts, version),
        *_code_system(OUTCOME_SYSTEM, "G0129 outcomes", "What a G0129 decision says to do with the encounter.", outcome_concepts, version),
        *_code_system(TAG_SYSTEM, "G0129 tags", "Tags the adapter puts on what it writes.", tag_concepts, version),
        *_code_system(TASK_CODE_SYSTEM, "G0129 Task codes", "The review Task's code, input and output types, and a person's answers.", task_concepts, version),
    ]
    return {f"{r['resourceType']}-{r['id']}.json": r for r in resources}
