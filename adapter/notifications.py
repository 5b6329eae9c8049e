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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import InvalidJSON, InvalidResource, NotFHIR

__all__ = ["Change", "Notification", "parse_bundle_notification", "parse_resource_delivery", "split_reference"]

SOURCE = "request body"


@dataclass(frozen=True, slots=True)
class Change:
    """One resource the notification says changed. `version_id` is "" when unknown."""

    resource_type: str
    resource_id: str
    version_id: str = ""
    resource: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Notification:
    kind: str  # handshake | heartbeat | event-notification | query-status | query-event | rest-hook
    subscription: str | None = None
    # Highest event number this notification accounts for (events-since-subscription-start).
    events_since_start: int | None = None
    first_event: int | None = None
    changes: tuple[Change, ...] = ()
    # True when the notification says something changed but not what (empty content).
    needs_catch_up: bool = False


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


def _version_of(resource: dict[str, Any]) -> str:
    meta = resource.get("meta")
    return str(meta.get("versionId") or "") if isinstance(meta, dict) else ""


def parse_resource_delivery(body: bytes, resource_type: str, resource_id: str, if_match: str | None) -> Change:
    """An R4 rest-hook `PUT /{type}/{id}` delivery. The body must be that resource."""
    try:
        resource = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"malformed JSON ({exc})", SOURCE) from None
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise NotFHIR("expected the changed FHIR resource", SOURCE)
    if resource["resourceType"] != resource_type:
        raise InvalidResource(f"the URL names {resource_type} but the body is a {resource['resourceType']}", SOURCE)
    if resource.get("id") not in (None, resource_id):
        raise InvalidResource(f"the URL names id {resource_id} but the body has id {resource.get('id')!r}", SOURCE)
    version = _version_of(resource)
    if not version and if_match:
        # HAPI sends the delivered version as If-Match: W/"3" when meta was stripped.
        version = if_match.removeprefix("W/").strip('"')
    return Change(resource_type, resource_id, version, resource)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _value(param: dict[str, Any]) -> Any:
    for key, value in param.items():
        if key.startswith("value"):
            return value
    return None


def _status_from_parameters(status: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Flatten backport Parameters into SubscriptionStatus-like fields and events."""
    fields: dict[str, Any] = {}
    events = []
    for param in status.get("parameter") or ():
        if not isinstance(param, dict):
            continue
        name = param.get("name")
        if name == "notification-event":
            parts = {p.get("name"): _value(p) for p in param.get("part") or () if isinstance(p, dict)}
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
    try:
        bundle = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"malformed JSON ({exc})", SOURCE) from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise NotFHIR("expected a subscription notification Bundle", SOURCE)
    entries = [e for e in bundle.get("entry") or () if isinstance(e, dict)]
    first = entries[0].get("resource") if entries else None
    if not isinstance(first, dict):
        raise InvalidResource("the notification Bundle has no status entry", SOURCE)
    if first.get("resourceType") == "Parameters":
        status, events = _status_from_parameters(first)
    elif first.get("resourceType") == "SubscriptionStatus":
        status = first
        events = [e for e in first.get("notificationEvent") or () if isinstance(e, dict)]
    else:
        raise InvalidResource(
            f"the first entry is a {first.get('resourceType')}, not a Parameters or SubscriptionStatus", SOURCE
        )
    kind = status.get("type")
    if kind not in ("handshake", "heartbeat", "event-notification", "query-status", "query-event"):
        raise InvalidResource(f"unknown notification type {kind!r}", SOURCE)
    subscription = status.get("subscription")
    if isinstance(subscription, dict):
        subscription = subscription.get("reference")
    sub_key = None
    if isinstance(subscription, str):
        parts = split_reference(subscription)
        sub_key = f"{parts[0]}/{parts[1]}" if parts else subscription

    # Resources carried in the bundle, findable by fullUrl and by Type/id.
    carried: dict[str, dict[str, Any]] = {}
    for entry in entries[1:]:
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") and resource.get("id"):
            carried[f"{resource['resourceType']}/{resource['id']}"] = resource
            if isinstance(entry.get("fullUrl"), str):
                carried[entry["fullUrl"]] = resource

    changes = []
    numbers = []
    for event in events:
        number = _int(event.get("eventNumber"))
        if number is not None:
            numbers.append(number)
        focus = event.get("focus")
        ref = focus.get("reference") if isinstance(focus, dict) else None
        parts = split_reference(ref) if isinstance(ref, str) else None
        if parts is None:
            continue
        rtype, rid, version = parts
        resource = carried.get(str(ref)) or carried.get(f"{rtype}/{rid}")
        if resource is not None:
            version = version or _version_of(resource)
        changes.append(Change(rtype, rid, version, resource))

    needs_catch_up = kind == "event-notification" and not changes
    return Notification(
        kind=kind,
        subscription=sub_key,
        events_since_start=_int(status.get("eventsSinceSubscriptionStart")) or (max(numbers) if numbers else None),
        first_event=min(numbers) if numbers else None,
        changes=tuple(changes),
        needs_catch_up=needs_catch_up,
    )
