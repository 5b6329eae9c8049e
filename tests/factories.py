"""Small, valid FHIR R4 resources for unit tests: one clean Medicare PHP day, to be varied.

Each test changes the one fact it is about, so a failure points at one rule.
"""

from __future__ import annotations

import copy
from typing import Any

from adapter.case import Case, build_cases
from adapter.decision import Decision
from adapter.ingest import Index, load_bytes
from adapter.rules import decide
from adapter.ruleset import RuleSet

import orjson

NUCC = "http://nucc.org/provider-taxonomy"
HCPCS = "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
CPT = "http://www.ama-assn.org/go/cpt"
REV = "https://www.nubc.org/CodeSystem/RevenueCodes"
CC = "https://www.nubc.org/CodeSystem/ConditionCodes"
TOB = "https://www.nubc.org/CodeSystem/TypeOfBill"


def _line(seq: int, code: str, system: str = HCPCS, revenue: str = "0915", date: str = "2025-03-04", qty: int = 1) -> dict[str, Any]:
    return {
        "sequence": seq,
        "revenue": {"coding": [{"system": REV, "code": revenue}]},
        "productOrService": {"coding": [{"system": system, "code": code}]},
        "servicedDate": date,
        "quantity": {"value": qty},
        "encounter": [{"reference": "Encounter/e1"}],
    }


def php_day() -> dict[str, dict[str, Any]]:
    """A clean Medicare PHP day that bills one G0129 unit; keyed by a short role name."""
    return copy.deepcopy(
        {
            "patient": {"resourceType": "Patient", "id": "p1"},
            "cms": {"resourceType": "Organization", "id": "cms", "name": "Centers for Medicare & Medicaid Services"},
            "hospital": {"resourceType": "Organization", "id": "h1", "name": "Riverside General Hospital"},
            "coverage": {
                "resourceType": "Coverage", "id": "cov1", "status": "active",
                "type": {"coding": [{"system": "https://nahdo.org/sopt", "code": "1"}]},
                "beneficiary": {"reference": "Patient/p1"}, "payor": [{"reference": "Organization/cms"}],
            },
            "ot": {
                "resourceType": "Practitioner", "id": "ot1",
                "qualification": [{"code": {"coding": [{"system": NUCC, "code": "225X00000X"}]}}],
            },
            "condition": {
                "resourceType": "Condition", "id": "dx1", "subject": {"reference": "Patient/p1"},
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F33.2"}]},
            },
            "encounter": {
                "resourceType": "Encounter", "id": "e1", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "serviceType": {"coding": [{"system": CC, "code": "41"}]},
                "subject": {"reference": "Patient/p1"},
                "period": {"start": "2025-03-04T08:30:00-05:00", "end": "2025-03-04T14:30:00-05:00"},
                "serviceProvider": {"reference": "Organization/h1"},
            },
            "session": {
                "resourceType": "Procedure", "id": "s1", "status": "completed",
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "84478008"}]},
                "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
                "performedPeriod": {"start": "2025-03-04T09:00:00-05:00", "end": "2025-03-04T09:50:00-05:00"},
                "performer": [{"actor": {"reference": "Practitioner/ot1"}}],
                "note": [{"text": "Graded task training."}],
                "outcome": {"text": "Completed 2 of 3 steps."},
            },
            "evaluation": {
                "resourceType": "Procedure", "id": "ev1", "status": "completed",
                "code": {"coding": [{"system": CPT, "code": "97166"}]},
                "subject": {"reference": "Patient/p1"}, "performedDateTime": "2025-02-24T10:00:00-05:00",
            },
            "goal": {
                "resourceType": "Goal", "id": "g1", "lifecycleStatus": "active",
                "description": {"text": "Follow a daily routine 5 of 7 days"}, "subject": {"reference": "Patient/p1"},
            },
            "coordination": {
                "resourceType": "Communication", "id": "c1", "status": "completed",
                "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
            },
            "claim": {
                "resourceType": "Claim", "id": "cl1", "status": "active",
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "institutional"}]},
                "use": "claim", "patient": {"reference": "Patient/p1"}, "created": "2025-03-05",
                "provider": {"reference": "Organization/h1"},
                "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
                "supportingInfo": [
                    {"sequence": 1, "category": {"coding": [{"code": "typeofbill"}]}, "code": {"coding": [{"system": TOB, "code": "0131"}]}},
                    {"sequence": 2, "category": {"coding": [{"code": "info"}]}, "code": {"coding": [{"system": CC, "code": "41"}]}},
                ],
                "diagnosis": [{
                    "sequence": 1, "diagnosisReference": {"reference": "Condition/dx1"},
                    "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/ex-diagnosistype", "code": "principal"}]}],
                }],
                "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": "Coverage/cov1"}}],
                "item": [_line(1, "G0410"), _line(2, "90834", system=CPT, revenue="0914")],
            },
        }
    )


def claim_line(seq: int, code: str, **kw: Any) -> dict[str, Any]:
    return _line(seq, code, **kw)


def index_of(resources: dict[str, dict[str, Any]] | list[dict[str, Any]]) -> Index:
    values = list(resources.values()) if isinstance(resources, dict) else resources
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in values if r]}
    entries, errors = load_bytes(orjson.dumps(bundle), "test")
    assert not errors, errors
    index = Index()
    for entry in entries:
        index.add(entry)
    return index


def case_of(resources: dict[str, dict[str, Any]], ruleset: RuleSet) -> Case:
    cases = build_cases(index_of(resources), ruleset)
    assert len(cases) == 1, cases
    return cases[0]


def decision_of(resources: dict[str, dict[str, Any]], ruleset: RuleSet) -> Decision:
    return decide(case_of(resources, ruleset), ruleset)
