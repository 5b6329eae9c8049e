"""The one door to the fhir.resources models (R4B, which reads R4 4.0.1 JSON).

No other module imports fhir.resources: the hot path stays on plain dicts, and what we write
back goes through `validate` first.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .errors import InvalidResource

__all__ = ["validate"]


def validate(resource: dict[str, Any], source: str = "") -> None:
    """Raise InvalidResource, naming the first failing paths, unless `resource` is valid R4B."""
    from fhir.resources.R4B import get_fhir_model_class

    rtype = resource.get("resourceType")
    try:
        model = get_fhir_model_class(str(rtype))
    except (KeyError, ValueError):
        raise InvalidResource(f"unknown resourceType {rtype!r}", source) from None
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or rtype}: {err['msg']}" for err in exc.errors()[:3]
        )
        more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise InvalidResource(f"{rtype} is not valid FHIR R4: {problems}{more}", source) from None
