"""FHIR Subscription notifications in, the work they ask for out. Pure: no I/O.

Shapes understood (fhir-subscriptions-hapi.md A and B):

- R4 rest-hook with a payload: `PUT {endpoint}/{Type}/{id}` carrying the resource. HAPI adds an
  `If-Match` with the version it delivers; here that is information, not a precondition.
- R4 rest-hook without a payload: a bodyless `POST {endpoint}`: something changed, find out by
  searching (a catch-up).
- Topic-based notification Bundles: the R4 backport `history` Bundle whose first entry is a
  `Parameters` (backport-subscription-status-r4), and the R4B/R5 form whose first entry is a
  `SubscriptionStatus` (`history` in R4B, `subscription-notification` in R5). Types handshake,
  heartbeat, event-notification, query-status, query-event; content empty, id-only or
  full-resource.

Everything here comes from the network, so it is checked before it is used (a 400, never a
500): JSON nested deeper than `MAX_DEPTH` (checked without recursion, before anything recurses
on it), resource types that are not exactly an R4 type, ids outside FHIR's `[A-Za-z0-9-.]{1,64}`
(a NUL, a CR/LF or a 10k-character id never reaches a job or a log line), event numbers that
are negative or beyond a signed 64-bit integer, and meta elements of the wrong shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import jsonio
from .errors import InvalidJSON, InvalidResource, NotFHIR
from .fhir_models import is_resource_type

__all__ = [
    "ID_PATTERN",
    "INSTANT_PATTERN",
    "MAX_DEPTH",
    "MAX_EVENT_NUMBER",
    "TYPE_PATTERN",
    "Change",
    "Notification",
    "check_depth",
    "check_id",
    "check_resource_type",
    "parse_bundle_notification",
    "parse_json",
    "parse_resource_delivery",
    "split_reference",
]

SOURCE = "request body"
PATH = "request path"
# Deep enough for any real resource (a Claim with its items and extensions, inside a Bundle, is
# about 12), far below the limits of reading (Python's recursion, ~1,000) and orjson's writing (255).
MAX_DEPTH = 64
# Event numbers are FHIR integer64 (events-since-subscription-start, eventNumber).
MAX_EVENT_NUMBER = 2**63 - 1

# FHIR's id; and the shape of a resource type name (which ones exist, the models say).
ID_PATTERN = r"[A-Za-z0-9\-.]{1,64}"
TYPE_PATTERN = r"[A-Z][A-Za-z]{0,63}"
# The shape of a FHIR instant (whether its date exists, `datetime.fromisoformat` says).
INSTANT_PATTERN = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})"
_ID = re.compile(ID_PATTERN)
_TYPE = re.compile(TYPE_PATTERN)
_NUMBER = re.compile(r"-?[0-9]+")
_INSTANT = re.compile(INSTANT_PATTERN)


@dataclass(frozen=True, slots=True)
class Change:
    """One resource the notification says changed. `version_id` is "" when unknown, and so is
    `last_updated` (the resource's `meta.lastUpdated`, known when the resource came along)."""

    resource_type: str
    resource_id: str
    version_id: str = ""
    resource: dict[str, Any] | None = field(default=None, compare=False)
    last_updated: str = ""


@dataclass(frozen=True, slots=True)
class Notification:
    kind: str  # handshake | heartbeat | event-notification | query-status | query-event | rest-hook
    subscription: str | None = None
    # Highest event number this notification accounts for (events-since-subscription-start).
    events_since_start: int | None = None
    first_event: int | None = None
    changes: tuple[Change, ...] = ()
    # True when the notification says something changed but not (all of) what: empty content,
    # or an event whose focus names no resource we can look up.
    needs_catch_up: bool = False


def _show(value: Any) -> str:
    """A value from a request, fit for a message: quoted, escaped (no CR/LF/NUL), shortened."""
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return repr(text[:60] + "..." if len(text) > 60 else text)


def parse_json(body: bytes, source: str = SOURCE) -> Any:
    """Parse a request body as FHIR JSON (`jsonio`): InvalidJSON when it is not JSON,
    InvalidResource when it nests deeper than MAX_DEPTH."""
    try:
        value = jsonio.loads(body)
    except jsonio.JSONDecodeError as exc:
        raise InvalidJSON(f"malformed JSON ({exc})", source) from None
    check_depth(value, source)
    return value


def check_depth(value: Any, source: str = SOURCE, limit: int = MAX_DEPTH) -> None:
    """Raise InvalidResource when objects and arrays nest deeper than `limit`. Iterative, so
    it is safe on any value `jsonio` can read."""
    if not isinstance(value, (dict, list)):
        return
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise InvalidResource(f"JSON nested deeper than {limit} levels", source)
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def check_resource_type(name: str, source: str = SOURCE, what: str = "resource type") -> None:
    """Raise InvalidResource unless `name` is exactly an R4 resource type (case-sensitive)."""
    # The same check as ingest's: whatever a path or a focus may name, a Bundle may hold.
    if not (_TYPE.fullmatch(name) and is_resource_type(name)):
        raise InvalidResource(f"{what} {_show(name)} is not an R4 resource type (they are case-sensitive)", source)


def check_id(value: Any, source: str = SOURCE, what: str = "id") -> str:
    """`value` if it is a FHIR id ([A-Za-z0-9-.]{1,64}), else InvalidResource."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidResource(f"{what} {_show(value)} is not a FHIR id ([A-Za-z0-9-.], 1 to 64 characters)", source)
    return value


def split_reference(reference: str) -> tuple[str, str, str] | None:
    """(type, id, version) of `Type/id`, `Type/id/_history/v` or an absolute URL ending so."""
    parts = reference.split("?")[0].rstrip("/").split("/")
    version = ""
    if len(parts) >= 4 and parts[-2] == "_history":
        version = parts[-1]
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-2][:1].isupper() or not parts[-1]:
        return None
    return parts[-2], parts[-1], version


def _focus(reference: str) -> tuple[str, str, str] | None:
    """(type, id, version) of an event's focus, checked; None when it names no resource we can
    look up (a `urn:` or contained reference, a bare id)."""
    if reference.startswith(("urn:", "#")):
        return None
    parts = reference.split("?")[0].rstrip("/").split("/")
    version = ""
    if len(parts) >= 4 and parts[-2] == "_history":
        version = check_id(parts[-1], SOURCE, f"the version of focus {_show(reference)}")
        parts = parts[:-2]
    if len(parts) < 2:
        return None
    what = f"focus {_show(reference)}:"
    check_resource_type(parts[-2], SOURCE, f"{what} resource type")
    return parts[-2], check_id(parts[-1], SOURCE, f"{what} id"), version


def _meta(resource: dict[str, Any], where: str) -> tuple[str, str]:
    """(versionId, lastUpdated) of a resource's meta, "" where absent; InvalidResource when
    either is there but not what FHIR says it is."""
    meta = resource.get("meta")
    if meta is None:
        return "", ""
    if not isinstance(meta, dict):
        raise InvalidResource(f"{where}: meta must be an object", SOURCE)
    version = meta.get("versionId")
    if version is not None:
        check_id(version, SOURCE, f"{where}: meta.versionId")
    updated = meta.get("lastUpdated")
    if updated is not None and not (isinstance(updated, str) and _INSTANT.fullmatch(updated)):
        raise InvalidResource(f"{where}: meta.lastUpdated {_show(updated)} is not a FHIR instant", SOURCE)
    return version or "", updated or ""


def parse_resource_delivery(body: bytes, resource_type: str, resource_id: str, if_match: str | None) -> Change:
    """An R4 rest-hook `PUT /{type}/{id}` delivery. The body must be that resource."""
    check_resource_type(resource_type, PATH)
    check_id(resource_id, PATH)
    resource = parse_json(body)
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise NotFHIR("expected the changed FHIR resource", SOURCE)
    if resource["resourceType"] != resource_type:
        raise InvalidResource(f"the URL names {resource_type} but the body is a {_show(resource['resourceType'])}", SOURCE)
    if resource.get("id") not in (None, resource_id):
        raise InvalidResource(f"the URL names id {resource_id} but the body has id {_show(resource.get('id'))}", SOURCE)
    version, updated = _meta(resource, f"{resource_type}/{resource_id}")
    if not version and if_match:
        # HAPI sends the delivered version as If-Match: W/"3" when meta was stripped. A header
        # that holds no FHIR id is a hint we cannot use, not a reason to refuse the delivery.
        hint = if_match.removeprefix("W/").strip('"')
        version = hint if _ID.fullmatch(hint) else ""
    return Change(resource_type, resource_id, version, resource, updated)


def _event_number(value: Any, what: str) -> int | None:
    """A FHIR integer64 event count (JSON number or string), or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not _NUMBER.fullmatch(value)):
        raise InvalidResource(f"{what} {_show(value)} is not a whole number", SOURCE)
    if isinstance(value, str) and len(value.lstrip("-")) > 19:
        # Beyond 19 digits no number fits in 64 bits (and int() of a huge string is slow).
        raise InvalidResource(f"{what} {_show(value)} is beyond a signed 64-bit integer", SOURCE)
    number = int(value)
    if number < 0:
        raise InvalidResource(f"{what} {number} is negative", SOURCE)
    if number > MAX_EVENT_NUMBER:
        raise InvalidResource(f"{what} {number} is beyond a signed 64-bit integer", SOURCE)
    return number


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidResource(f"{what} must be an array", SOURCE)
    return value


def _value(param: dict[str, Any]) -> Any:
    for key, value in param.items():
        if key.startswith("value"):
            return value
    return None


def _status_from_parameters(status: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Flatten backport Parameters into SubscriptionStatus-like fields and events."""
    fields: dict[str, Any] = {}
    events = []
    for param in _list(status.get("parameter"), "Parameters.parameter"):
        if not isinstance(param, dict):
            continue
        name = param.get("name")
        if name == "notification-event":
            parts = {p.get("name"): _value(p) for p in _list(param.get("part"), "Parameters.parameter.part") if isinstance(p, dict)}
            events.append({"eventNumber": parts.get("event-number"), "focus": parts.get("focus")})
        elif name in ("subscription", "type", "status", "events-since-subscription-start", "topic"):
            fields[name] = _value(param)
    return {
        "type": fields.get("type"),
        "subscription": fields.get("subscription"),
        "eventsSinceSubscriptionStart": fields.get("events-since-subscription-start"),
    }, events


def parse_bundle_notification(body: bytes) -> Notification:
    """A topic-based notification Bundle (R4 backport, R4B or R5)."""
    bundle = parse_json(body)
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise NotFHIR("expected a subscription notification Bundle", SOURCE)
    entries = [e for e in _list(bundle.get("entry"), "Bundle.entry") if isinstance(e, dict)]
    first = entries[0].get("resource") if entries else None
    if not isinstance(first, dict):
        raise InvalidResource("the notification Bundle has no status entry", SOURCE)
    if first.get("resourceType") == "Parameters":
        status, events = _status_from_parameters(first)
    elif first.get("resourceType") == "SubscriptionStatus":
        status = first
        events = [e for e in _list(first.get("notificationEvent"), "SubscriptionStatus.notificationEvent") if isinstance(e, dict)]
    else:
        raise InvalidResource(
            f"the first entry is a {_show(first.get('resourceType'))}, not a Parameters or SubscriptionStatus", SOURCE
        )
    kind = status.get("type")
    if not isinstance(kind, str) or kind not in ("handshake", "heartbeat", "event-notification", "query-status", "query-event"):
        raise InvalidResource(f"unknown notification type {_show(kind)}", SOURCE)
    subscription = status.get("subscription")
    if isinstance(subscription, dict):
        subscription = subscription.get("reference")
    sub_key = None
    if isinstance(subscription, str):
        parts = _focus(subscription)
        # The key of the event numbers kept per Subscription: short and checked.
        sub_key = f"{parts[0]}/{parts[1]}" if parts else None

    # Resources carried in the bundle, findable by fullUrl and by Type/id.
    carried: dict[str, dict[str, Any]] = {}
    for entry in entries[1:]:
        resource = entry.get("resource")
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str) and isinstance(resource.get("id"), str):
            carried[f"{resource['resourceType']}/{resource['id']}"] = resource
            if isinstance(entry.get("fullUrl"), str):
                carried[entry["fullUrl"]] = resource

    changes = []
    numbers = []
    unknown_focus = 0
    for event in events:
        number = _event_number(event.get("eventNumber"), "event number")
        if number is not None:
            numbers.append(number)
        focus = event.get("focus")
        ref = focus.get("reference") if isinstance(focus, dict) else None
        parts = _focus(ref) if isinstance(ref, str) else None
        if parts is None:
            unknown_focus += focus is not None
            continue
        rtype, rid, version = parts
        resource = carried.get(str(ref)) or carried.get(f"{rtype}/{rid}")
        updated = ""
        if resource is not None:
            if (resource["resourceType"], resource["id"]) != (rtype, rid):
                raise InvalidResource(
                    f"focus {_show(ref)} is carried as {_show(resource['resourceType'] + '/' + resource['id'])}", SOURCE
                )
            meta_version, updated = _meta(resource, f"{rtype}/{rid}")
            version = version or meta_version
        changes.append(Change(rtype, rid, version, resource, updated))

    since = _event_number(status.get("eventsSinceSubscriptionStart"), "eventsSinceSubscriptionStart")
    return Notification(
        kind=kind,
        subscription=sub_key,
        events_since_start=since or (max(numbers) if numbers else None),
        first_event=min(numbers) if numbers else None,
        changes=tuple(changes),
        needs_catch_up=kind == "event-notification" and (not changes or unknown_focus > 0),
    )
