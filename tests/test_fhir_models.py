"""The one door to the R4B models: the resource types, and validating what we change."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from adapter import jsonio
from adapter.errors import InvalidResource
from adapter.fhir_models import RESOURCE_TYPES, _sample, _shape, _string, is_resource_type, validate, validate_changes
from adapter.vocabulary import DECISION_EXTENSION, LINE_EXTENSION

from .conftest import FIXTURES


def test_the_resource_types_are_the_models_concrete_resources() -> None:
    from fhir.resources.R4B import fhirtypes, get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    concrete = set()
    for name in (n[:-4] for n in dir(fhirtypes) if n.endswith("Type") and n[:1].isupper()):
        try:
            model = get_fhir_model_class(name)
        except ValueError:  # a primitive: no model
            continue
        if name not in ("Resource", "DomainResource") and issubclass(model, Resource):
            concrete.add(name)
    assert RESOURCE_TYPES == concrete


@pytest.mark.parametrize("name, expected", [("Encounter", True), ("encounter", False), ("Address", False), ("Resource", False), ("Base64Binary", False)])
def test_is_resource_type(name: str, expected: bool) -> None:
    assert is_resource_type(name) is expected


def claim() -> dict[str, Any]:
    bundle = jsonio.loads((FIXTURES / "01-medicare-php-hospital.json").read_bytes())
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Claim")


def line(date: str = "2025-03-04", sequence: int = 9, reference: str = "Encounter/php01-enc") -> dict[str, Any]:
    return {
        "extension": [{"url": LINE_EXTENSION, "valueReference": {"reference": reference}}],
        "sequence": sequence,
        "productOrService": {"coding": [{"system": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "G0129"}]},
        "servicedDate": date,
        "quantity": {"value": 1},
        "encounter": [{"reference": reference}],
    }


def with_line(item: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(claim())
    changed["item"].append(item)
    changed["extension"] = [{"url": DECISION_EXTENSION, "extension": [{"url": "outcome", "valueCode": "bill"}]}]
    return changed


def test_valid_additions_pass_and_agree_with_the_whole_model() -> None:
    for n in range(3):  # the same shape again: answered from what the model said the first time
        changed = with_line(line(f"2025-03-0{n + 4}", 9 + n, f"Encounter/day-{n}"))
        validate_changes(claim(), changed)
        validate(changed)


def shape(value: Any) -> tuple[Any, ...] | None:
    tokens: list[Any] = []
    return tuple(tokens) if _shape(value, tokens) else None


def test_a_shape_stands_for_its_sample_alone() -> None:
    # Values Python holds equal (1, 1.0, true) and JSON does not are different shapes, and so
    # are a string and the same text as a member's name or as structure.
    values: list[Any] = [
        {"valueInteger": 1},
        {"valueInteger": 1.0},
        {"valueInteger": True},
        {"valueInteger": "1"},
        {"valueInteger": None},
        {"valueInteger": [1]},
        {"valueInteger": {"value": 1}},
        {"valueInteger": [], "url": "x"},
        {"valueInteger": ["url", "x"]},
        [{"a": "b"}],
        [{"a": {}}, "b"],
        "valueInteger",
    ]
    shapes = [shape(v) for v in values]
    assert len(set(shapes)) == len(values)
    for value, tokens in zip(values, shapes):
        assert tokens is not None and _sample(iter(tokens)) == value  # nothing varying: itself


def test_a_shape_is_the_sample_of_its_varying_values() -> None:
    item = line("2025-03-04", 9, "Encounter/day-1")
    same = shape(line("2026-12-31", 12, "Encounter/day-2"))
    assert shape(item) == same
    assert _sample(iter(same or ())) == line("2000-01-01", 1, "sample")
    assert shape(line(date="2025-02-30")) is None  # not a date: the element is checked as it is
    assert shape({**item, "encounter": [{"reference": "Encounter/x"}, None]}) is None


@pytest.mark.parametrize("text", ["Encounter/php01-enc", "a b", "", " ", "a\tb\r\n", "a\x0bb", "x\x1c", "\x7f", "café", "a\u00a0b", "\x85"])
def test_a_string_sample_is_what_the_r4_string_pattern_says(text: str) -> None:
    # Printable ASCII is taken without the pattern; whatever else is looked at by it.
    assert (_string(text) is not None) == bool(re.fullmatch(r"[ \r\n\t\S]+", text))


@pytest.mark.parametrize(
    "item, problem",
    [
        (line(date="2025-02-30"), "servicedDate"),  # the date pattern lets it through; the model does not
        (line(date="03/04/2025"), "servicedDate"),
        (line(sequence=0), "sequence"),
        (line(reference=""), "reference"),
        ({**line(), "quantity": {"value": "one"}}, "quantity"),
        ({**line(), "productOrService": "G0129"}, "productOrService"),
        ({**line(), "servicedDate": {"start": "2025-03-04"}}, "servicedDate"),  # not a primitive at all
        ({**line(), "encounter": [{"reference": "Encounter/php01-enc"}, None]}, "encounter"),  # JSON has no null in an array
    ],
)
def test_an_invalid_addition_is_refused_like_the_whole_model_refuses_it(item: dict[str, Any], problem: str) -> None:
    changed = with_line(item)
    with pytest.raises(InvalidResource, match=problem):
        validate_changes(claim(), changed, "claims.ndjson")
    with pytest.raises(InvalidResource):
        validate(changed)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda c: c | {"created": "yesterday"}, "created"),  # a member changed
        (lambda c: {k: v for k, v in c.items() if k != "patient"}, "patient"),  # one taken away
        (lambda c: c | {"payee": "the hospital"}, "payee"),  # one added
    ],
)
def test_a_change_outside_our_elements_is_checked_whole(change, named: str) -> None:
    original = claim()
    with pytest.raises(InvalidResource, match=named):
        validate_changes(original, change(original))


def test_a_draft_is_checked_whole() -> None:
    draft = {"resourceType": "Claim", "id": "g0129-day", "status": "draft", "use": "claim"}
    with pytest.raises(InvalidResource):  # no type, patient, provider, priority, insurance...
        validate_changes(None, draft)
