"""The one door to the fhir.resources models (R4B, which reads R4 4.0.1 JSON).

No other module imports fhir.resources: the hot path stays on plain dicts, and what we write
back goes through `validate` first.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from .errors import InvalidResource

__all__ = ["is_resource_type", "validate", "validate_changes"]

# Abstract bases: models exist for them, but no resource has these types.
_ABSTRACT = frozenset({"Resource", "DomainResource"})


def is_resource_type(name: str) -> bool:
    """True when `name` is, exactly (case-sensitively), a concrete R4 (R4B model) resource type.

    `Encounter` yes; `encounter`, `ENCOUNTER`, a data type such as `Address` or the abstract
    `Resource` no. The caches hold at most one entry per model, whatever names are asked about:
    names come from HTTP requests.
    """
    canonical = _model_names().get(name.lower())
    return canonical == name and _is_concrete_resource(canonical)


@lru_cache(maxsize=1)
def _model_names() -> dict[str, str]:
    """Every model name the package declares (resources, data types, backbone elements), by
    its lower-case spelling; reading the type table imports no model."""
    from fhir.resources.R4B import fhirtypes

    return {n[:-4].lower(): n[:-4] for n in dir(fhirtypes) if n.endswith("Type") and n[:1].isupper()}


@lru_cache(maxsize=None)
def _is_concrete_resource(name: str) -> bool:
    # Called with names of _model_names() only, so the cache stays bounded. Imports that one model.
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    return name not in _ABSTRACT and issubclass(get_fhir_model_class(name), Resource)


def validate(resource: dict[str, Any], source: str = "") -> None:
    """Raise InvalidResource, naming the first failing paths, unless `resource` is valid R4B."""
    rtype = resource.get("resourceType")
    try:
        model = _model(str(rtype))
    except (KeyError, ValueError):
        raise InvalidResource(f"unknown resourceType {rtype!r}", source) from None
    _check(model, resource, str(rtype), source)


# The elements an annotation adds to or changes in a Claim, and the model of each one of them.
_CHANGED_ELEMENTS = {"extension": "Extension", "item": "ClaimItem", "supportingInfo": "ClaimSupportingInfo", "meta": "Meta"}


def validate_changes(original: dict[str, Any], changed: dict[str, Any], source: str = "") -> None:
    """Raise InvalidResource unless what `changed` adds to or changes in the Claim `original`
    is valid R4B, each element checked with its own model: a new extension as an Extension, a
    new or corrected line as a ClaimItem, and so on. What `changed` keeps of `original` is not
    looked at again; a change outside those elements is checked by validating the whole."""
    if original.get("resourceType") != "Claim" or any(
        changed.get(k) != original.get(k) for k in changed.keys() | original.keys() if k not in _CHANGED_ELEMENTS
    ):
        validate(changed, source)
        return
    for name, model_name in _CHANGED_ELEMENTS.items():
        before, after = original.get(name), changed.get(name)
        if after is None or after == before:
            continue
        model = _model(model_name)
        if isinstance(after, list) and isinstance(before, list | None):
            kept = before or []
            for n, element in enumerate(after):
                if element not in kept:
                    _check(model, element, f"Claim.{name}[{n}]", source)
        else:
            _check(model, after, f"Claim.{name}", source)


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
