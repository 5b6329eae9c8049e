"""What the service's OpenAPI document says, so that it says what the service does.

FastAPI describes what it can see: typed parameters and models. The sidecar reads raw bodies (a
notification must be stored before anything else is done with it) and answers FHIR resources
with `application/fhir+json`, which FastAPI cannot see. This module supplies the rest: the
request bodies with an example of each shape, every response with its media type and schema
(an `OperationOutcome` for every error), the bearer scheme of the webhook, and no 422 (the
service answers a request it cannot use with 400 and an OperationOutcome).
"""

from __future__ import annotations

from typing import Any

from . import notifications

__all__ = [
    "CLAIM_EXAMPLE",
    "EVALUATE_EXAMPLES",
    "EVALUATE_RESULT_EXAMPLE",
    "FHIR_JSON",
    "ID_PATTERN",
    "NOTIFY_EXAMPLES",
    "SCHEMAS",
    "TYPE_PATTERN",
    "complete",
    "error_responses",
    "fhir_response",
    "request_body",
]

FHIR_JSON = "application/fhir+json"
# As the intake checks them, anchored for JSON Schema.
TYPE_PATTERN = f"^{notifications.TYPE_PATTERN}$"
ID_PATTERN = f"^{notifications.ID_PATTERN}$"

_REF = "#/components/schemas/"

SCHEMAS: dict[str, dict[str, Any]] = {
    "OperationOutcome": {
        "type": "object",
        "description": "The answer to every request the service could not use, and to a notification it accepted.",
        "required": ["resourceType", "issue"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
            "issue": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["severity", "code"],
                    "properties": {
                        "severity": {"type": "string", "enum": ["fatal", "error", "warning", "information"]},
                        "code": {"type": "string"},
                        "diagnostics": {"type": "string"},
                        "expression": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    },
    "Resource": {
        "type": "object",
        "description": "Any FHIR R4 resource (JSON). Its type is an R4 resource type, case-sensitive.",
        "required": ["resourceType"],
        "properties": {
            "resourceType": {"type": "string", "pattern": TYPE_PATTERN},
            "id": {"type": "string", "pattern": ID_PATTERN},
            "meta": {
                "type": "object",
                "properties": {
                    "versionId": {"type": "string", "pattern": ID_PATTERN},
                    "lastUpdated": {"type": "string", "format": "date-time"},
                },
            },
        },
    },
    "Bundle": {
        "type": "object",
        "description": "A FHIR R4 Bundle.",
        "required": ["resourceType"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["Bundle"]},
            "type": {"type": "string"},
            "entry": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"fullUrl": {"type": "string"}, "resource": {"$ref": _REF + "Resource"}},
                },
            },
        },
    },
}

_STATUS_TEXT = {
    400: "Malformed or unusable input: not JSON, not the expected FHIR resource, nested more than 64 "
    "levels, a resource type that is not exactly an R4 type, an id outside [A-Za-z0-9-.]{1,64}, an "
    "event number that is negative or beyond a signed 64-bit integer.",
    401: "No or wrong `Authorization: Bearer <G0129_WEBHOOK_TOKEN>`.",
    404: "No such endpoint.",
    413: "The body is larger than G0129_MAX_BODY_BYTES.",
}


def _content(schema: str | dict[str, Any]) -> dict[str, Any]:
    return {FHIR_JSON: {"schema": {"$ref": _REF + schema} if isinstance(schema, str) else schema}}


def fhir_response(description: str, *schemas: str) -> dict[str, Any]:
    """A response holding one of the named FHIR resources."""
    schema: str | dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": [{"$ref": _REF + s} for s in schemas]}
    return {"description": description, "content": _content(schema)}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Each status answered with an OperationOutcome."""
    return {status: fhir_response(_STATUS_TEXT[status], "OperationOutcome") for status in statuses}


def request_body(description: str, schema: str, examples: dict[str, Any], required: bool = True) -> dict[str, Any]:
    """A request body of FHIR JSON, with examples (`{name: value}`)."""
    return {
        "description": description,
        "required": required,
        "content": {
            FHIR_JSON: {
                "schema": {"$ref": _REF + schema},
                "examples": {name: {"value": value} for name, value in examples.items()},
            }
        },
    }


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """Add the schemas and the bearer scheme to FastAPI's document, and take out the 422s it
    adds for parameters (the service never answers 422)."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(SCHEMAS)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "G0129_WEBHOOK_TOKEN, which `g0129 subscribe` puts in each Subscription's channel.header.",
        }
    }
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for response in responses.values():
                schema = response.get("content", {}).get(FHIR_JSON, {}).get("schema", {})
                # FastAPI gives a non-JSON media type `"type": "string"` and merges ours into it.
                if "$ref" in schema or "anyOf" in schema:
                    schema.pop("type", None)
    return document


# --- examples ---------------------------------------------------------------------------------

CLAIM_EXAMPLE: dict[str, Any] = {
    "resourceType": "Claim",
    "id": "php01-claim",
    "meta": {"versionId": "4", "lastUpdated": "2025-03-05T17:20:00.000-05:00"},
    "status": "active",
    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "institutional"}]},
    "use": "claim",
    "patient": {"reference": "Patient/php01-pat"},
    "created": "2025-03-05",
    "provider": {"reference": "Organization/php01-hosp"},
    "priority": {"coding": [{"code": "normal"}]},
    "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": "Coverage/php01-cov"}}],
}


def _backport(kind: str, since: int, events: list[tuple[int, str]]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": "https://ehr.example.org/fhir/Subscription/g0129-encounter"}},
        {"name": "topic", "valueCanonical": "http://example.org/topic/encounter-changed"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(since)},
    ]
    for number, focus in events:
        parameters.append(
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": str(number)},
                    {"name": "focus", "valueReference": {"reference": f"https://ehr.example.org/fhir/{focus}"}},
                ],
            }
        )
    return {
        "resourceType": "Bundle",
        "type": "history",
        "timestamp": "2025-03-05T17:20:01Z",
        "entry": [{"fullUrl": "urn:uuid:5c6b8a0e-4f7d-4a5e-9b2c-1d3e4f5a6b7c", "resource": {"resourceType": "Parameters", "parameter": parameters}}],
    }


NOTIFY_EXAMPLES: dict[str, Any] = {
    "backport-id-only-event": _backport("event-notification", 12, [(12, "Encounter/php01-enc/_history/3")]),
    "backport-heartbeat": _backport("heartbeat", 12, []),
    "r5-event": {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "entry": [
            {
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": "event-notification",
                    "eventsSinceSubscriptionStart": "7",
                    "subscription": {"reference": "Subscription/g0129-procedure"},
                    "topic": "http://example.org/topic/procedure-changed",
                    "notificationEvent": [{"eventNumber": "7", "focus": {"reference": "Procedure/php01-ot1"}}],
                }
            }
        ],
    },
}

EVALUATE_EXAMPLES: dict[str, Any] = {
    "php-day": {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "http://ehr.example.org/fhir/Patient/php01-pat", "resource": {"resourceType": "Patient", "id": "php01-pat"}},
            {
                "fullUrl": "http://ehr.example.org/fhir/Encounter/php01-enc",
                "resource": {
                    "resourceType": "Encounter",
                    "id": "php01-enc",
                    "status": "finished",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                    "subject": {"reference": "Patient/php01-pat"},
                    "period": {"start": "2025-03-04T09:00:00-05:00", "end": "2025-03-04T15:00:00-05:00"},
                },
            },
            {
                "fullUrl": "http://ehr.example.org/fhir/Procedure/php01-ot1",
                "resource": {
                    "resourceType": "Procedure",
                    "id": "php01-ot1",
                    "status": "completed",
                    "code": {"coding": [{"system": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "G0129"}]},
                    "subject": {"reference": "Patient/php01-pat"},
                    "encounter": {"reference": "Encounter/php01-enc"},
                    "performedPeriod": {"start": "2025-03-04T10:00:00-05:00", "end": "2025-03-04T10:50:00-05:00"},
                },
            },
        ],
    }
}

EVALUATE_RESULT_EXAMPLE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [
        {"resource": {**CLAIM_EXAMPLE, "meta": {"tag": [{"system": "https://g0129-adapter.org/fhir/CodeSystem/tags", "code": "annotated"}]}}},
        {
            "resource": {
                "resourceType": "Parameters",
                "parameter": [
                    {
                        "name": "decision",
                        "valueString": '{"encounter":"Encounter/php01-enc","claim":"Claim/php01-claim","outcome":"bill",'
                        '"program":"PHP","payer":"medicare","lines":[{"code":"G0129","units":1,"service_date":"2025-03-04",'
                        '"revenue_code":"0430","modifiers":[],"procedures":["Procedure/php01-ot1"]}],"findings":[],'
                        '"missing_data":[],"rules_passed":["PROGRAM"],"ruleset_version":"2026.11.1","flagged_lines":[]}',
                    }
                ],
            }
        },
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "error",
                        "code": "value",
                        "diagnostics": "request body: Procedure/php01-ot2 Procedure.status: 'done' is not a Procedure.status code",
                        "expression": ["Procedure.status"],
                    }
                ],
            }
        },
    ],
}
