"""Which patient a resource belongs to, so a replay can decide one patient at a time.

A decision reads one patient's compartment (Encounter, Procedure, Claim, Coverage, Condition,
EpisodeOfCare, Goal, DocumentReference...) plus the resources many patients share and that
belong to none (Organization, Practitioner, PractitionerRole, Location...). `route` says which
of the two a resource is, and for the first, the patient's key: the same key whatever form the
reference takes (`Patient/1`, `https://ehr.example/fhir/Patient/1`, a Bundle's `urn:uuid:`
fullUrl of the Patient entry). The elements are those of the FHIR R4 Patient compartment
(https://hl7.org/fhir/R4/compartmentdefinition-patient.html) for the resources we read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypedDict

import msgspec

from . import jsonio
from .fhir_models import is_resource_type
from .ingest import Entry, type_id_tail

__all__ = ["SHARED", "SHARED_TYPES", "UNROUTED", "Unrouted", "line_route", "patient_key", "route", "routing_view"]

SHARED: Final = ""  # the route of a resource that belongs to no patient

# Resources outside every patient compartment that a decision reads through references.
SHARED_TYPES: Final = frozenset(
    {"Organization", "Practitioner", "PractitionerRole", "Location", "HealthcareService", "Endpoint", "Device", "Medication", "Substance"}
)

# The elements naming a resource's patient, by type, from the Patient compartment definition;
# for a type not listed, the usual names are tried in this order. (A dict, not a Mapping: the
# compiled routing looks each line's type up in it, with a dict's own lookup.)
PATIENT_ELEMENTS: Final[dict[str, tuple[str, ...]]] = {
    "Encounter": ("subject",),
    "Procedure": ("subject",),
    "Claim": ("patient",),
    "ClaimResponse": ("patient",),
    "ExplanationOfBenefit": ("patient",),
    "Coverage": ("beneficiary", "subscriber", "policyHolder"),
    "Condition": ("subject",),
    "EpisodeOfCare": ("patient",),
    "DocumentReference": ("subject",),
    "Goal": ("subject",),
    "Task": ("for",),
    "Account": ("subject",),
}
_USUAL: Final = ("subject", "patient", "beneficiary", "for")

# The members of a resource `route` reads. msgspec decodes a JSON object into this TypedDict as
# a dict of just these members, checking the syntax of the rest without building it: the routing
# pass of a replay reads each resource 3-4x faster than a full parse.
_RoutingView = TypedDict(  # type: ignore[misc]  # (the members are data, not literals)
    "_RoutingView",
    {name: object for name in ("resourceType", "id", *_USUAL, *(n for names in PATIENT_ELEMENTS.values() for n in names))},
    total=False,
)
_VIEW: Final = msgspec.json.Decoder(_RoutingView)
# The methods called on each routed line, bound once: a method called by name from compiled code
# (`_VIEW.decode(data)`, `data.isascii()`) is looked up on its type at each call, ~250
# instructions, more than `isascii` itself.
_DECODE_VIEW: Final = _VIEW.decode
_IS_ASCII: Final = bytes.isascii


def routing_view(data: bytes) -> Any:
    """What `route` reads of a resource's JSON (`data`): a dict of its type, id and the members
    that can name its patient; a JSON value that is not an object, whole (for the error saying
    what it is). Raises `jsonio.JSONDecodeError` when `data` is not JSON, as `jsonio.loads` would."""
    try:
        if not _IS_ASCII(data):
            data.decode()  # the strings the view skips are not decoded: UTF-8 is checked here
        return _DECODE_VIEW(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        # Not an object, or not JSON: read whole, for the value or for jsonio's error.
        return jsonio.loads(data)


def patient_key(entry: Entry) -> str:
    """The key a Patient entry is routed by: `Patient/<id>`, the type and id of its absolute
    fullUrl when it has no id, else its fullUrl."""
    if entry.id is not None:
        return entry.key
    if entry.full_url and "://" in entry.full_url:
        return type_id_tail(entry.full_url)
    return entry.key


def route(entry: Entry, local: Mapping[str, str]) -> str | None:
    """The patient key `entry` belongs with, SHARED for a resource many patients share, or None
    when it names no patient we can tell (it is then decided with the others like it).

    `local` maps the fullUrls of the file's Patient entries to their keys: a transaction Bundle
    refers to its Patient by the entry's `urn:uuid:` fullUrl.
    """
    if entry.type == "Patient":
        return patient_key(entry)
    return _route_of(entry.type, entry.resource, local)


class Unrouted:
    """The type of UNROUTED."""


UNROUTED: Final = Unrouted()
_NO_PATIENTS: Final[dict[str, str]] = {}  # a line has no other entry to refer to


def line_route(resource: dict[str, Any]) -> str | None | Unrouted:
    """`route` for the resource of one NDJSON line (its `routing_view`), from the view alone, or
    UNROUTED when the line is not simply one resource with an id (a Bundle, a Patient without an
    id, no resource at all): such a line goes through `ingest` and `route` whole. An export's
    lines are nearly all simple, and routing them without an `Entry` each took a quarter off the
    routing pass (8.3 to 6.1 µs a line, 10k encounters, compiled)."""
    rtype = resource.get("resourceType")
    rid = resource.get("id")
    if type(rtype) is not str or type(rid) is not str or rtype == "Bundle" or not is_resource_type(rtype):
        return UNROUTED
    if rtype == "Patient":
        return f"Patient/{rid}"  # its Entry's key, as `patient_key` gives it
    return _route_of(rtype, resource, _NO_PATIENTS)


def _route_of(rtype: str, resource: dict[str, Any], local: Mapping[str, str]) -> str | None:
    for name in PATIENT_ELEMENTS.get(rtype, _USUAL):
        key = _patient_reference(resource.get(name), local)
        if key is not None:
            return key
    return SHARED if rtype in SHARED_TYPES else None


def _patient_reference(value: Any, local: Mapping[str, str]) -> str | None:
    if not isinstance(value, dict):
        return None
    ref = value.get("reference")
    if not isinstance(ref, str) or not ref or ref.startswith("#"):
        return None
    if local:  # (an NDJSON line has no other entry: not even the reference's hash is needed)
        hit = local.get(ref)
        if hit is not None:
            return hit
    if ref.startswith("urn:"):
        return None  # a Patient entry of another file: not one we can tell
    tail = type_id_tail(ref)
    return tail if tail.startswith("Patient/") else None
