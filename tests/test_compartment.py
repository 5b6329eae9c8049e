"""Which patient a resource is routed with: the same key whatever form its reference takes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from adapter import jsonio
from adapter.compartment import SHARED, UNROUTED, line_route, route, routing_view
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
    # A replay's routing pass reads only the members that route a resource: it routes the same.
    padded = {"text": {"status": "generated", "div": "<div>1.5 {x}</div>"}, **resource, "extension": [{"valueDecimal": 2.50}]}
    assert route(entry(routing_view(orjson.dumps(padded)), full_url), {}) == expected
    # An NDJSON line with an id is routed from its view alone, with no Entry: the same way.
    if full_url is None:
        line = {"id": "x1", **padded}
        assert line_route(routing_view(orjson.dumps(line))) == route(entry(line), {})


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Patient"},  # no id: keyed as its Entry is, by ingest
        {"resourceType": "Encounter", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Encounter", "id": 7, "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Bundle", "id": "b1", "type": "collection", "entry": []},
        {"resourceType": "encounter", "id": "e1"},
        {"resourceType": ["Encounter"], "id": "e1"},
        {"id": "e1"},
    ],
)
def test_a_line_that_is_not_simply_one_resource_with_an_id_goes_the_whole_way(resource: dict[str, Any]) -> None:
    # ingest reads it whole, for its entries or for the error saying what is wrong with it.
    assert line_route(routing_view(orjson.dumps(resource))) is UNROUTED


def test_the_routing_view_keeps_only_what_routes() -> None:
    line = b'{"resourceType":"Coverage","id":"c1","status":"active","beneficiary":{"reference":"Patient/p1"},"subscriber":{"reference":"Patient/p0"},"costToBeneficiary":[{"valueMoney":{"value":20.00}}]}'
    assert routing_view(line) == {"resourceType": "Coverage", "id": "c1", "beneficiary": {"reference": "Patient/p1"}, "subscriber": {"reference": "Patient/p0"}}
    assert routing_view(b'["not", "a", "resource"]') == ["not", "a", "resource"]


@pytest.mark.parametrize(
    "bad",
    [b"1.", b"01", b".5", b"1e", b"NaN", b"Infinity", b"[1,]", b'{"a" 1}', b'"\\ud800"', b'"\\q"', b'"\t"', b'"\xff"', b"[", b'{"b":}'],
)
def test_the_routing_view_refuses_what_a_full_reading_refuses(bad: bytes) -> None:
    # The members it skips are checked all the same (syntax, UTF-8): a line that passes routing
    # is read again whole when its partition is decided, and must not fail there.
    line = b'{"resourceType":"Procedure","text":' + bad + b',"subject":{"reference":"Patient/p1"}}'
    with pytest.raises(jsonio.JSONDecodeError):
        jsonio.loads(line)
    with pytest.raises(jsonio.JSONDecodeError):
        routing_view(line)


def test_a_transaction_bundles_urn_reference_routes_with_its_patient_entry() -> None:
    urn = "urn:uuid:9b2e6f0e-3f1c-4f36-9a52-5d2b8f3f1c11"
    encounter = entry({"resourceType": "Encounter", "subject": {"reference": urn}})
    assert route(encounter, {urn: "Patient/p1"}) == "Patient/p1"
