"""Which patient a resource is routed with: the same key whatever form its reference takes."""

from __future__ import annotations

from typing import Any

import pytest

from adapter.compartment import SHARED, route
from adapter.ingest import Entry


def entry(resource: dict[str, Any], full_url: str | None = None) -> Entry:
    return Entry(resource, "test", full_url)


@pytest.mark.parametrize(
    "resource, full_url, expected",
    [
        ({"resourceType": "Patient", "id": "p1"}, None, "Patient/p1"),
        ({"resourceType": "Patient"}, "https://ehr.example.org/fhir/Patient/p1", "Patient/p1"),
        ({"resourceType": "Encounter", "subject": {"reference": "Patient/p1"}}, None, "Patient/p1"),
        ({"resourceType": "Encounter", "subject": {"reference": "https://ehr.example.org/fhir/Patient/p1"}}, None, "Patient/p1"),
        ({"resourceType": "Procedure", "subject": {"reference": "Patient/p1/_history/3"}}, None, "Patient/p1"),
        ({"resourceType": "Claim", "patient": {"reference": "Patient/p1"}}, None, "Patient/p1"),
        ({"resourceType": "Claim", "patient": {"reference": "Patient/p1/"}}, None, "Patient/p1"),
        ({"resourceType": "Claim", "patient": {"reference": "Patient/p1?_format=json"}}, None, "Patient/p1"),
        ({"resourceType": "Claim", "patient": {"reference": "Patient/"}}, None, None),
        # A Coverage's beneficiary is the patient, whoever holds the policy.
        ({"resourceType": "Coverage", "policyHolder": {"reference": "Patient/parent"}, "beneficiary": {"reference": "Patient/p1"}}, None, "Patient/p1"),
        ({"resourceType": "Coverage", "subscriber": {"reference": "Patient/p1"}}, None, "Patient/p1"),
        ({"resourceType": "Organization", "id": "hosp"}, None, SHARED),
        ({"resourceType": "Practitioner", "id": "ot"}, None, SHARED),
        ({"resourceType": "PractitionerRole", "practitioner": {"reference": "Practitioner/ot"}}, None, SHARED),
        # A resource whose patient cannot be told is decided with the others like it.
        ({"resourceType": "Procedure", "subject": {"reference": "Group/g1"}}, None, None),
        ({"resourceType": "Encounter", "subject": {"reference": "#contained-patient"}}, None, None),
        ({"resourceType": "Encounter", "subject": {"reference": "urn:uuid:9b2e6f0e-3f1c-4f36-9a52-5d2b8f3f1c11"}}, None, None),
        ({"resourceType": "Encounter", "subject": {"display": "Jane Doe"}}, None, None),
    ],
)
def test_route(resource: dict[str, Any], full_url: str | None, expected: str | None) -> None:
    assert route(entry(resource, full_url), {}) == expected


def test_a_transaction_bundles_urn_reference_routes_with_its_patient_entry() -> None:
    urn = "urn:uuid:9b2e6f0e-3f1c-4f36-9a52-5d2b8f3f1c11"
    encounter = entry({"resourceType": "Encounter", "subject": {"reference": urn}})
    assert route(encounter, {urn: "Patient/p1"}) == "Patient/p1"
