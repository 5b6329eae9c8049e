"""The one door to the fhir.resources models (R4B, which reads R4 4.0.1 JSON).

No other module imports fhir.resources: the hot path stays on plain dicts, and what we write
back goes through `validate` first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import date
from functools import lru_cache
from typing import Any, Final

from pydantic import ValidationError

from .errors import InvalidResource

__all__ = ["RESOURCE_TYPES", "is_resource_type", "load_claim_models", "validate", "validate_changes"]

# Every concrete resource type of the R4B models (R4's, and the few R4B adds), as the models
# declare them (tests/test_fhir_models.py checks the list against them). Kept as data: asking
# the models means importing one module per type, ~0.2 s each, on every replay's first line.
RESOURCE_TYPES: Final = frozenset(
    """
    Account ActivityDefinition AdministrableProductDefinition AdverseEvent AllergyIntolerance
    Appointment AppointmentResponse AuditEvent Basic Binary BiologicallyDerivedProduct
    BodyStructure Bundle CapabilityStatement CarePlan CareTeam CatalogEntry ChargeItem
    ChargeItemDefinition Citation Claim ClaimResponse ClinicalImpression ClinicalUseDefinition
    CodeSystem Communication CommunicationRequest CompartmentDefinition Composition ConceptMap
    Condition Consent Contract Coverage CoverageEligibilityRequest CoverageEligibilityResponse
    DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest DeviceUseStatement
    DiagnosticReport DocumentManifest DocumentReference Encounter Endpoint EnrollmentRequest
    EnrollmentResponse EpisodeOfCare EventDefinition Evidence EvidenceReport EvidenceVariable
    ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal GraphDefinition Group
    GuidanceResponse HealthcareService ImagingStudy Immunization ImmunizationEvaluation
    ImmunizationRecommendation ImplementationGuide Ingredient InsurancePlan Invoice Library
    Linkage List Location ManufacturedItemDefinition Measure MeasureReport Media Medication
    MedicationAdministration MedicationDispense MedicationKnowledge MedicationRequest
    MedicationStatement MedicinalProductDefinition MessageDefinition MessageHeader
    MolecularSequence NamingSystem NutritionOrder NutritionProduct Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization
    OrganizationAffiliation PackagedProductDefinition Parameters Patient PaymentNotice
    PaymentReconciliation Person PlanDefinition Practitioner PractitionerRole Procedure
    Provenance Questionnaire QuestionnaireResponse RegulatedAuthorization RelatedPerson
    RequestGroup ResearchDefinition ResearchElementDefinition ResearchStudy ResearchSubject
    RiskAssessment Schedule SearchParameter ServiceRequest Slot Specimen SpecimenDefinition
    StructureDefinition StructureMap Subscription SubscriptionStatus SubscriptionTopic Substance
    SubstanceDefinition SupplyDelivery SupplyRequest Task TerminologyCapabilities TestReport
    TestScript ValueSet VerificationResult VisionPrescription
    """.split()
)


def is_resource_type(name: str) -> bool:
    """True when `name` is, exactly (case-sensitively), a concrete R4 (R4B model) resource type.

    `Encounter` yes; `encounter`, `ENCOUNTER`, a data type such as `Address` or the abstract
    `Resource` no."""
    return name in RESOURCE_TYPES


def validate(resource: dict[str, Any], source: str = "") -> None:
    """Raise InvalidResource, naming the first failing paths, unless `resource` is valid R4B."""
    rtype = resource.get("resourceType")
    try:
        model = _model(str(rtype))
    except (KeyError, ValueError):
        raise InvalidResource(f"unknown resourceType {rtype!r}", source) from None
    _check(model, resource, str(rtype), source)


# The elements an annotation adds to or changes in a Claim, and the model of each one of them.
_CHANGED_ELEMENTS: Final = {"extension": "Extension", "item": "ClaimItem", "supportingInfo": "ClaimSupportingInfo", "meta": "Meta"}


def validate_changes(original: dict[str, Any] | None, changed: dict[str, Any], source: str = "") -> None:
    """Raise InvalidResource unless what `changed` adds to or changes in the Claim `original`
    is valid R4B, each element checked with its own model: a new extension as an Extension, a
    new or corrected line as a ClaimItem, and so on. What `changed` keeps of `original` is not
    looked at again; a change outside those elements is checked by validating the whole. With
    no `original` (a draft Claim we made), all of `changed` is ours and is checked whole."""
    if original is None:
        _check_element("Claim", changed, "Claim", source)
        return
    if original.get("resourceType") != "Claim" or _changed_elsewhere(original, changed):
        validate(changed, source)
        return
    for name, model_name in _CHANGED_ELEMENTS.items():
        before, after = original.get(name), changed.get(name)
        if after is None or after == before:
            continue
        if isinstance(after, list) and isinstance(before, list | None):
            kept = before or []
            for n, element in enumerate(after):
                if element not in kept:
                    _check_element(model_name, element, f"Claim.{name}[{n}]", source)
        else:
            _check_element(model_name, after, f"Claim.{name}", source)


def _changed_elsewhere(original: dict[str, Any], changed: dict[str, Any]) -> bool:
    """Whether `changed` differs from `original` outside the elements of `_CHANGED_ELEMENTS`.
    What an annotation leaves as it was is the same object in both (annotate copies only what it
    changes), so each member is compared only when it is not."""
    for key, after in changed.items():
        if key not in _CHANGED_ELEMENTS:
            before = original.get(key)
            if before is not after and before != after:
                return True
    return any(value is not None for key, value in original.items() if key not in changed and key not in _CHANGED_ELEMENTS)


def load_claim_models() -> None:
    """Import the models that validating a Claim (whole, or what we change in it) uses, now:
    processes forked afterwards share them, where each would import them (~0.15 s) itself."""
    for name in ("Claim", *_CHANGED_ELEMENTS.values()):
        _model(name)


# The values that change from one element we add to the next (the encounter a line is for, its
# date, its sequence), with the R4 primitive each must be (https://hl7.org/fhir/R4/datatypes.html)
# and a sample of it. An element is validated by its model once per shape, these values stood in
# for by their samples, and each value is checked against its primitive: a replay adds the same
# few shapes to a million Claims, and the models take ~1 ms an element.
_DATE: Final = re.compile(r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?")
_STRING: Final = re.compile(r"[ \r\n\t\S]+")


_ID: Final = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _date(value: Any) -> Any:
    return _date_sample(value) if isinstance(value, str) else None


@lru_cache(maxsize=4096)  # the same few days recur on every Claim
def _date_sample(value: str) -> str | None:
    if not _DATE.fullmatch(value):
        return None
    if len(value) == 10:
        try:
            date.fromisoformat(value)  # the pattern lets 2025-02-30 through; the models do not
        except ValueError:
            return None
    return "2000-01-01"


# Bound once: called by name on each string we write, a method is looked up on `str` at each
# call from compiled code.
_IS_ASCII: Final = str.isascii
_IS_PRINTABLE: Final = str.isprintable


def _string(value: Any) -> Any:
    if not isinstance(value, str):
        return None
    # Printable ASCII is space or not whitespace, so it matches: nearly every string we write,
    # checked without the pattern (a tenth of validating what we add).
    return "sample" if value and _IS_ASCII(value) and _IS_PRINTABLE(value) or _STRING.fullmatch(value) else None


def _positive_int(value: Any) -> Any:
    return 1 if type(value) is int and value > 0 else None


def _id(value: Any) -> Any:
    return "sample" if isinstance(value, str) and _ID.fullmatch(value) else None


def _string_or_number(value: Any) -> Any:
    """Identifier.value is a string, Quantity.value a decimal."""
    return _string(value) if isinstance(value, str) else (1 if type(value) is int else None)


# Each takes a value and gives its sample, or None when the value is not of its primitive.
# Dates we write are dates, so a dateTime element we fill (created, a period) is checked as one.
_VARYING: Final[dict[str, Callable[[Any], Any]]] = {
    "id": _id,
    "reference": _string,
    "value": _string_or_number,
    "servicedDate": _date,
    "valueDate": _date,
    "created": _date,
    "start": _date,
    "end": _date,
    "sequence": _positive_int,
    "valuePositiveInt": _positive_int,
}
# What the models said of each shape (`_shape`) they were asked about: valid or not.
_SHAPES: Final[dict[tuple[Any, ...], bool]] = {}
_MAX_SHAPES: Final = 4096

# The markers of a shape's structure: objects of their own, which no JSON value equals.
_OBJECT: Final = object()
_ARRAY: Final = object()
_END: Final = object()


def _shape(value: Any, into: list[Any]) -> bool:
    """Add to `into` the shape of `value` (an element we write): its structure and members, each
    varying value (`_VARYING`) replaced by its sample, as a flat list of tokens that `_sample`
    turns back into that element. False when a varying value is not of its primitive, or an
    array holds a null: the element is then validated as it is, for the model's own message.

    A value that is not a string follows its type, so that 1, 1.0 and true (equal in Python) are
    told apart; a member's name is always a string. It walks every element we write, so it is
    written for speed: a string, the commonest value, is added without a call; JSON holds only
    exact dicts and lists (`type(...) is` is cheaper than isinstance); and it makes a list of
    tokens, not the sample itself: building a dict a level and then its JSON as the key took
    ~1.5x the instructions."""
    if type(value) is dict:
        into.append(_OBJECT)
        for key, item in value.items():
            into.append(key)
            varying = _VARYING.get(key)
            if varying is not None:
                item = varying(item)
                if item is None:
                    return False
            if type(item) is str:
                into.append(item)
            elif not _shape(item, into):
                return False
        into.append(_END)
        return True
    if type(value) is list:
        into.append(_ARRAY)
        for item in value:
            if type(item) is str:
                into.append(item)
            elif item is None or not _shape(item, into):
                return False
        into.append(_END)
        return True
    if type(value) is not str:
        into.append(type(value))
    into.append(value)
    return True


def _sample(tokens: Iterator[Any]) -> Any:
    """The element whose shape `tokens` goes on with (`_shape`'s), varying values as samples."""
    token = next(tokens)
    if token is _OBJECT:
        members = {}
        for key in tokens:
            if key is _END:
                break
            members[key] = _sample(tokens)
        return members
    if token is _ARRAY:
        items = []
        while (item := _sample(tokens)) is not _END:
            items.append(item)
        return items
    if isinstance(token, type):
        return next(tokens)
    return token  # a string, or the end of the array being read


def _check_element(model_name: str, element: Any, where: str, source: str) -> None:
    tokens: list[Any] = [model_name]
    if _shape(element, tokens):
        key = tuple(tokens)
        valid = _SHAPES.get(key)
        if valid is None:
            try:
                shape = iter(key)
                next(shape)  # the model's name
                _check(_model(model_name), _sample(shape), where, source)
                valid = True
            except InvalidResource:
                valid = False
            if len(_SHAPES) >= _MAX_SHAPES:
                _SHAPES.clear()
            _SHAPES[key] = valid
        if valid:
            return
    _check(_model(model_name), element, where, source)  # raises, naming what is wrong


@lru_cache(maxsize=None)
def _model(name: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(name)


def _check(model: Any, value: Any, where: str, source: str) -> None:
    try:
        model.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or where}: {err['msg']}" for err in exc.errors()[:3]
        )
        more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise InvalidResource(f"{where} is not valid FHIR R4: {problems}{more}", source) from None
