"""Decision + Claim JSON -> annotated Claim JSON. Pure and idempotent.

Everything the Claim had is kept. What a decision changes depends on its outcome:
- `bill`: the G0129 lines are put in (an EHR line for the same date is updated in place);
- `review`: `Claim.item` stays as the EHR wrote it (nobody has looked yet); the proposed lines
  travel inside the decision extension;
- `do-not-bill`: no line is added, and a G0129 line the EHR wrote is flagged, never deleted.
In every case the lines we added earlier for this encounter that the decision no longer bills
are taken back, the condition code and type of bill are added when known and absent, and the
decision rides on the Claim as one extension under our canonical URL, with a `meta.tag` marking
the Claim as annotated. Annotating twice with the same decision changes nothing. With no Claim
yet, `draft_claim` makes an institutional draft whose id and identifier derive from the
encounter, so a re-run never makes a second one.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

from .case import Case, codings
from .decision import Decision, Line
from .ruleset import RuleSet
from .vocabulary import (
    ADDED_EXTENSION,
    ANNOTATED_TAG,
    CORRECTED_EXTENSION,
    DECISION_EXTENSION,
    DRAFT_IDENTIFIER_SYSTEM,
    LINE_EXTENSION,
    LINE_FLAG_EXTENSION,
    TAG_SYSTEM,
)

__all__ = ["annotate", "draft_claim", "draft_claim_id"]
_ID: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

Resource = dict[str, Any]


def draft_claim_id(encounter: str) -> str:
    """A stable, valid FHIR id for the draft claim of an encounter ("Encounter/<id>")."""
    candidate = "g0129-" + encounter.split("/")[-1]
    if _ID.match(candidate):
        return candidate
    return "g0129-" + hashlib.sha256(encounter.encode()).hexdigest()[:32]


def draft_claim(case: Case, rules: RuleSet) -> Resource:
    """An institutional draft Claim for an encounter that has none yet."""
    dates = [s.service_date for s in case.sessions if s.service_date]
    if not dates and case.encounter_date:
        dates = [case.encounter_date]
    created = min(dates) if dates else None
    claim: Resource = {
        "resourceType": "Claim",
        "id": draft_claim_id(case.encounter),
        # The identifier links the draft to its encounter even while it has no line (a day we do
        # not bill), so the next run finds it instead of making another; lines carry
        # item.encounter, the link every FHIR server can search.
        "identifier": [{"system": DRAFT_IDENTIFIER_SYSTEM, "value": case.encounter}],
        "status": "draft",
        "type": {"coding": [{"system": rules.system_uri("claim_type"), "code": "institutional"}]},
        "use": "claim",
        "patient": {"reference": case.patient} if case.patient else {"display": "Patient not recorded"},
        "provider": {"reference": case.provider} if case.provider else {"display": "Provider not recorded"},
        "priority": {"coding": [{"system": rules.system_uri("process_priority"), "code": "normal"}]},
        "insurance": [
            {
                "sequence": 1,
                "focal": True,
                "coverage": {"reference": case.coverage} if case.coverage else {"display": "Coverage not recorded"},
            }
        ],
    }
    if created:
        claim["created"] = created
        claim["billablePeriod"] = {"start": min(dates), "end": max(dates)}
    if case.diagnosis:
        system = rules.system_uri(case.diagnosis.system) if case.diagnosis.system else None
        coding = {"code": case.diagnosis.code} | ({"system": system} if system else {})
        claim["diagnosis"] = [
            {
                "sequence": 1,
                "diagnosisCodeableConcept": {"coding": [coding]},
                "type": [{"coding": [{"system": rules.system_uri("diagnosis_type"), "code": "principal"}]}],
            }
        ]
    return claim


def _next_sequence(items: list[Any]) -> int:
    return max((i.get("sequence", 0) for i in items if isinstance(i, dict) and isinstance(i.get("sequence"), int)), default=0) + 1


def _is_g0129_item(item: Any, rules: RuleSet) -> bool:
    return isinstance(item, dict) and any(
        (rules.system_key(s), c) == rules.billed_code for s, c in codings(item.get("productOrService"))
    )


def _item_date(item: Resource) -> str | None:
    date = item.get("servicedDate")
    if isinstance(date, str):
        return date[:10]
    period = item.get("servicedPeriod")
    if isinstance(period, dict) and isinstance(period.get("start"), str):
        return str(period["start"])[:10]
    return None


def _revenue(code: str, rules: RuleSet) -> Resource:
    return {"coding": [{"system": rules.system_uri("revenue"), "code": code}]}


def _correct(item: Resource, field: str, value: Any) -> None:
    """Set an EHR line's `field`, keeping what the EHR wrote in the g0129-corrected extension
    (once: a later correction keeps the EHR's value, not ours), or dropping that record when the
    value goes back to the EHR's."""
    extensions = [e for e in item.get("extension") or () if isinstance(e, dict)]
    record = next((e for e in extensions if e.get("url") == CORRECTED_EXTENSION), None)
    parts = [p for p in (record or {}).get("extension") or () if isinstance(p, dict)]
    value_key = {"revenue": "valueCodeableConcept", "quantity": "valueQuantity"}[field]
    original = next((p for p in parts if p.get("url") == field or (p.get("url") == "absent" and p.get("valueCode") == field)), None)
    if original is None:
        original = {"url": field, value_key: item[field]} if field in item else {"url": "absent", "valueCode": field}
        parts.append(original)
    item[field] = value
    if original.get(value_key) == value:
        parts.remove(original)
    others = [e for e in extensions if e.get("url") != CORRECTED_EXTENSION]
    if parts:
        others.append({"url": CORRECTED_EXTENSION, "extension": parts})
    item.pop("extension", None)
    if others:
        item["extension"] = others


def _put_line(claim: Resource, line: Line, encounter: str, rules: RuleSet) -> None:
    items = claim.setdefault("item", [])
    for item in items:
        if _is_g0129_item(item, rules) and _item_date(item) == line.service_date:
            current = next((c for _, c in codings(item.get("revenue"))), None)
            if current != line.revenue_code:
                _correct(item, "revenue", _revenue(line.revenue_code, rules))
            quantity = item.get("quantity") if isinstance(item.get("quantity"), dict) else {}
            if quantity.get("value") != line.units:
                _correct(item, "quantity", {**quantity, "value": line.units})
            return
    new: Resource = {
        "extension": [{"url": LINE_EXTENSION, "valueReference": {"reference": encounter}}],
        "sequence": _next_sequence(items),
        "revenue": _revenue(line.revenue_code, rules),
        "productOrService": {
            "coding": [{"system": rules.system_uri(rules.billed_code[0]), "code": rules.billed_code[1], "display": rules.billed_display}]
        },
    }
    if line.modifiers:
        new["modifier"] = [{"coding": [{"system": rules.system_uri("hcpcs"), "code": m}]} for m in line.modifiers]
    new["servicedDate"] = line.service_date
    new["quantity"] = {"value": line.units}
    new["encounter"] = [{"reference": encounter}]
    items.append(new)


def _for_encounter(extension: Any, url: str, encounter: str) -> bool:
    """Whether `extension` is ours of kind `url` and names `encounter` (directly or in a part)."""
    if not isinstance(extension, dict) or extension.get("url") != url:
        return False
    parts = [extension] + [p for p in extension.get("extension") or () if isinstance(p, dict) and p.get("url") == "encounter"]
    return any((p.get("valueReference") or {}).get("reference") == encounter for p in parts)


def _withdraw_lines(claim: Resource, decision: Decision) -> None:
    """Drop the lines we added for this encounter on dates the decision no longer bills, and
    the flags it put on the EHR's lines (the decision puts back those that still hold)."""
    keep = {line.service_date for line in decision.lines} if decision.outcome == "bill" else set()
    items = claim.get("item")
    if not isinstance(items, list):
        return
    kept = []
    for item in items:
        if isinstance(item, dict):
            extensions = item.get("extension") or ()
            if any(_for_encounter(e, LINE_EXTENSION, decision.encounter) for e in extensions) and _item_date(item) not in keep:
                continue
            if any(_for_encounter(e, LINE_FLAG_EXTENSION, decision.encounter) for e in extensions):
                rest = [e for e in extensions if not _for_encounter(e, LINE_FLAG_EXTENSION, decision.encounter)]
                item = {k: v for k, v in item.items() if k != "extension"}
                if rest:
                    item = {"extension": rest, **item}
            else:
                item = dict(item)  # the line is annotate's own from here on: see `annotate`
        kept.append(item)
    claim["item"] = kept


def _flag_lines(claim: Resource, decision: Decision) -> None:
    """Mark the EHR's G0129 lines the decision does not support; they stay for a person."""
    for flag in decision.flagged_lines:
        item = _find_item(claim, flag.sequence, flag.index)
        if item is None:
            continue
        item["extension"] = list(item.get("extension") or ()) + [
            {
                "url": LINE_FLAG_EXTENSION,
                "extension": [
                    {"url": "reason", "valueCode": flag.reason},
                    {"url": "encounter", "valueReference": {"reference": decision.encounter}},
                ],
            }
        ]


def _find_item(claim: Resource, sequence: int | None, index: int) -> Resource | None:
    items = [i for i in claim.get("item") or () if isinstance(i, dict)]
    if sequence is not None:
        return next((i for i in items if i.get("sequence") == sequence), None)
    return items[index] if index < len(items) else None


def _own_list(resource: Resource, name: str) -> Any:
    """`resource[name]` (an empty list when absent), a copy of its own when it is a list: what
    annotate appends to must not be the list of the Claim as read, which it shares."""
    value = resource.setdefault(name, [])
    if isinstance(value, list):
        value = resource[name] = list(value)
    return value


def _put_supporting_info(claim: Resource, category: Resource, system_key: str, code: str, encounter: str, rules: RuleSet) -> None:
    for info in claim.setdefault("supportingInfo", []):
        if isinstance(info, dict) and any(rules.system_key(s) == system_key for s, _ in codings(info.get("code"))):
            return
    infos = _own_list(claim, "supportingInfo")
    infos.append(
        {
            "extension": [{"url": ADDED_EXTENSION, "valueReference": {"reference": encounter}}],
            "sequence": _next_sequence(infos),
            "category": category,
            "code": {"coding": [{"system": rules.system_uri(system_key), "code": code}]},
        }
    )


def _condition_code(claim: Resource, program: str, encounter: str, rules: RuleSet) -> None:
    code = next(c for c, p in rules.claim_condition_codes.items() if p == program)
    category = {"coding": [{"system": rules.system_uri("supporting_info_category"), "code": "info"}]}
    _put_supporting_info(claim, category, "condition_code", code, encounter, rules)


def _type_of_bill(claim: Resource, encounter: str, rules: RuleSet) -> None:
    """Copy a type of bill found only in Claim.subType to the CARIN-style supportingInfo slot."""
    has_slot = any(
        isinstance(i, dict) and any(c == "typeofbill" for _, c in codings(i.get("category")))
        for i in claim.get("supportingInfo") or ()
    )
    if has_slot:
        return
    tob = next((c for s, c in codings(claim.get("subType")) if rules.system_key(s) == "bill_type"), None)
    if tob:
        category = {"coding": [{"system": rules.system_uri("carin_supporting_info"), "code": "typeofbill"}]}
        _put_supporting_info(claim, category, "bill_type", tob, encounter, rules)


def _proposed_line(line: Line, rules: RuleSet) -> Resource:
    parts: list[Resource] = [
        {"url": "code", "valueCoding": {"system": rules.system_uri("hcpcs"), "code": line.code}},
        {"url": "units", "valuePositiveInt": line.units},
        {"url": "serviceDate", "valueDate": line.service_date},
        {"url": "revenueCode", "valueCoding": {"system": rules.system_uri("revenue"), "code": line.revenue_code}},
    ]
    parts += [{"url": "modifier", "valueCoding": {"system": rules.system_uri("hcpcs"), "code": m}} for m in line.modifiers]
    parts += [{"url": "procedure", "valueReference": {"reference": p}} for p in line.procedures]
    return {"url": "proposedLine", "extension": parts}


def _decision_extension(decision: Decision, rules: RuleSet) -> Resource:
    parts: list[Resource] = [{"url": "outcome", "valueCode": decision.outcome}]
    parts += [{"url": "rule", "valueCode": rule} for rule in decision.rule_ids]
    parts.append({"url": "rulesetVersion", "valueString": decision.ruleset_version})
    parts.append({"url": "encounter", "valueReference": {"reference": decision.encounter}})
    if decision.outcome == "review":
        # Nobody has looked yet: the lines wait here, not in Claim.item.
        parts += [_proposed_line(line, rules) for line in decision.lines]
    return {"url": DECISION_EXTENSION, "extension": parts}


def _decision_encounter(extension: Any) -> str | None:
    if not isinstance(extension, dict) or extension.get("url") != DECISION_EXTENSION:
        return None
    for part in extension.get("extension") or ():
        if isinstance(part, dict) and part.get("url") == "encounter":
            return str((part.get("valueReference") or {}).get("reference"))
    return None


def annotate(claim: Resource, decision: Decision, rules: RuleSet) -> Resource:
    """The Claim with the decision written onto it. `claim` itself is left untouched.

    Because this is idempotent, `annotate(c) == c` means the Claim already says everything the
    decision says: a writer uses that to skip a write (and so never loops on its own writes).

    The result shares with `claim` every part the annotation leaves as it was (a whole deep copy
    was most of annotate's time, and a Claim is mostly what the EHR wrote). So nothing here
    changes a dict or list in place unless it is the result's own: the Claim's top level, its
    `item` list and each line in it (made so by `_withdraw_lines`, which runs first), the
    `supportingInfo` list, `meta` and its `tag` list (made so where they are added to). Nothing
    after annotate changes an annotated Claim in place either.
    """
    out: Resource = dict(claim)
    _withdraw_lines(out, decision)
    if decision.outcome == "bill":
        for line in decision.lines:
            _put_line(out, line, decision.encounter, rules)
    _flag_lines(out, decision)
    if not out.get("item"):  # FHIR JSON has no empty arrays
        out.pop("item", None)
    if decision.program:
        _condition_code(out, decision.program, decision.encounter, rules)
    _type_of_bill(out, decision.encounter, rules)
    # One decision extension per encounter: a claim covering several PHP days carries each.
    mine = _decision_extension(decision, rules)
    extensions = list(out.get("extension") or ())
    for n, ext in enumerate(extensions):
        if _decision_encounter(ext) == decision.encounter:
            extensions[n] = mine
            break
    else:
        extensions.append(mine)
    out["extension"] = extensions
    meta = out.setdefault("meta", {})
    if isinstance(meta, dict):
        meta = out["meta"] = dict(meta)
    tags = _own_list(meta, "tag")
    if not any(isinstance(t, dict) and t.get("system") == TAG_SYSTEM and t.get("code") == "annotated" for t in tags):
        tags.append(dict(ANNOTATED_TAG))
    return out
