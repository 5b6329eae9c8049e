"""Create or update, idempotently, the R4 rest-hook Subscriptions the sidecar listens to.

One Subscription per watched type, under a fixed id (`g0129-encounter`, ..., `g0129-task`), so
running the command again updates them instead of adding more. The Claim criteria exclude Claims carrying
our `annotated` tag, so our own write-backs do not notify us; the webhook token travels in
`channel.header` (visible to whoever can read Subscriptions: use a token that only opens the
webhook).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from .vocabulary import TAG_SYSTEM, TASK_CODE_SYSTEM
from .errors import FatalFHIRError
from .fhir_client import FHIRClient

__all__ = ["SubscriptionResult", "desired_subscriptions", "subscribe"]

CRITERIA = {
    "Encounter": "Encounter?",
    "Procedure": "Procedure?",
    "Claim": f"Claim?_tag:not={TAG_SYSTEM}|annotated",
    # A person's answer: our review Tasks once completed (those we write are requested or
    # cancelled, so our own writes do not notify us).
    "Task": f"Task?code={TASK_CODE_SYSTEM}|review&status=completed",
}


@dataclass(frozen=True, slots=True)
class SubscriptionResult:
    id: str
    criteria: str
    action: str  # created | updated | unchanged
    status: str  # the server's status after waiting


def desired_subscriptions(endpoint: str, token: str, payload: bool = True) -> list[dict[str, Any]]:
    subscriptions = []
    for rtype, criteria in CRITERIA.items():
        channel: dict[str, Any] = {
            "type": "rest-hook",
            "endpoint": endpoint.rstrip("/"),
            "header": [f"Authorization: Bearer {token}"],
        }
        if payload:
            # With a payload HAPI PUTs the resource to {endpoint}/{Type}/{id}; without one it
            # POSTs nothing to {endpoint} and the adapter catches up by search.
            channel["payload"] = "application/fhir+json"
        subscriptions.append(
            {
                "resourceType": "Subscription",
                "id": f"g0129-{rtype.lower()}",
                "status": "requested",
                "reason": f"G0129 billing adapter: decide OT in PHP/IOP when a {rtype} changes",
                "criteria": criteria,
                "channel": channel,
            }
        )
    return subscriptions


def _same(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return (
        current.get("criteria") == wanted["criteria"]
        and current.get("channel") == wanted["channel"]
        and current.get("status") in ("requested", "active")
    )


async def subscribe(
    client: FHIRClient, endpoint: str, token: str, payload: bool = True, wait: float = 60.0
) -> list[SubscriptionResult]:
    """Upsert the Subscriptions; then wait up to `wait` seconds for them to become active."""
    actions = []
    for wanted in desired_subscriptions(endpoint, token, payload):
        try:
            current = (await client.read("Subscription", wanted["id"])).resource
        except FatalFHIRError as exc:
            if exc.status not in (404, 410):
                raise
            current = None
        if current is not None and _same(current, wanted):
            actions.append((wanted, "unchanged"))
            continue
        await client.update(wanted)
        actions.append((wanted, "created" if current is None else "updated"))
    deadline = time.monotonic() + wait
    statuses: dict[str, str] = {}
    while True:
        for wanted, _ in actions:
            resource = (await client.read("Subscription", wanted["id"])).resource or {}
            statuses[wanted["id"]] = str(resource.get("status"))
        if all(s == "active" for s in statuses.values()) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(1.0)
    return [SubscriptionResult(w["id"], w["criteria"], action, statuses[w["id"]]) for w, action in actions]
