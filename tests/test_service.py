"""The webhook service: every notification shape, auth, limits, durability, health, metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import respx

from adapter.errors import UsageError
from adapter.ruleset import load_ruleset
from adapter.service import create_app
from adapter.settings import Settings

from .conftest import AUTH, BASE, FIXTURES, TOKEN, serve
from .fakefhir import FakeFHIR

GOOD = FIXTURES / "01-medicare-php-hospital.json"


@pytest.fixture
def fake() -> Any:
    server = FakeFHIR(BASE)
    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="fhir.test").mock(side_effect=server)
        yield server


def claim(version: str = "4") -> dict[str, Any]:
    return {"resourceType": "Claim", "id": "c9", "meta": {"versionId": version}, "status": "active"}


def backport(kind: str, events: list[tuple[int, str | None]], since: int, content: str = "full-resource") -> bytes:
    """An R4 backport notification Bundle (Parameters status entry)."""
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": "https://ehr.example/fhir/Subscription/s1"}},
        {"name": "topic", "valueCanonical": "http://example.org/topic/claim-changed"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(since)},
    ]
    entries: list[dict[str, Any]] = []
    for number, focus in events:
        parts: list[dict[str, Any]] = [{"name": "event-number", "valueString": str(number)}]
        if focus and content != "empty":
            parts.append({"name": "focus", "valueReference": {"reference": f"https://ehr.example/fhir/{focus}"}})
            entry: dict[str, Any] = {"fullUrl": f"https://ehr.example/fhir/{focus}", "request": {"method": "PUT", "url": focus}, "response": {"status": "200"}}
            if content == "full-resource":
                rtype, rid = focus.split("/")
                entry["resource"] = {"resourceType": rtype, "id": rid, "meta": {"versionId": "7"}, "status": "active"}
            entries.append(entry)
        params.append({"name": "notification-event", "part": parts})
    status = {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "parameter": params},
              "request": {"method": "GET", "url": "https://ehr.example/fhir/Subscription/s1/$status"}, "response": {"status": "200"}}
    return orjson.dumps({"resourceType": "Bundle", "type": "history", "timestamp": "2026-01-01T00:00:00Z", "entry": [status, *entries]})


def r5(kind: str, focus: str | None, number: int) -> bytes:
    status: dict[str, Any] = {"resourceType": "SubscriptionStatus", "status": "active", "type": kind,
                              "eventsSinceSubscriptionStart": str(number), "subscription": {"reference": "Subscription/s5"},
                              "topic": "http://example.org/topic/encounter"}
    if focus:
        status["notificationEvent"] = [{"eventNumber": str(number), "focus": {"reference": focus}}]
    return orjson.dumps({"resourceType": "Bundle", "type": "subscription-notification", "entry": [{"resource": status}]})


def jobs(app: Any, state: str = "pending") -> list[tuple[str, str, str, str]]:
    return [(j.kind, j.resource_type, j.resource_id, j.version_id) for j in app.state.queue.list(state)]


def gauge(app: Any, name: str, labels: dict[str, str] | None = None) -> float:
    return app.state.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_service_needs_a_webhook_token(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="G0129_WEBHOOK_TOKEN"):
        create_app(Settings.from_env({"G0129_FHIR_BASE_URL": BASE, "G0129_DATA_DIR": str(tmp_path)}))


def test_wrong_or_missing_token_is_401_operation_outcome(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
            r = await client.put("/notify/Claim/c9", content=orjson.dumps(claim()), headers=headers)
            assert r.status_code == 401
            assert r.json()["resourceType"] == "OperationOutcome" and r.json()["issue"][0]["code"] == "login"
        assert jobs(app) == []

    serve(tmp_path, test)


def test_rest_hook_put_is_stored_and_deduplicated(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        for _ in range(2):
            r = await client.put("/notify/Claim/c9", content=orjson.dumps(claim()), headers={**AUTH, "If-Match": 'W/"4"'})
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
        assert jobs(app) == [("resource", "Claim", "c9", "4")]
        assert gauge(app, "g0129_notifications_received_total", {"shape": "rest-hook-resource"}) == 2
        assert gauge(app, "g0129_notifications_deduplicated_total") == 1
        metrics = (await client.get("/metrics")).text
        assert "g0129_queue_pending 1.0" in metrics
        assert f'g0129_ruleset_info{{version="{load_ruleset().version}"}} 1.0' in metrics

    serve(tmp_path, test)


def test_if_match_gives_the_version_when_meta_was_stripped(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        body = {"resourceType": "Procedure", "id": "p1", "status": "completed"}
        await client.put("/notify/Procedure/p1", content=orjson.dumps(body), headers={**AUTH, "If-Match": 'W/"3"'})
        assert jobs(app) == [("resource", "Procedure", "p1", "3")]

    serve(tmp_path, test)


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/notify/Claim/c9", b"{not json", 400),
        ("/notify/Claim/c9", b'{"resourceType": "Encounter", "id": "c9"}', 400),
        ("/notify/Claim/c9", b'{"resourceType": "Claim", "id": "other"}', 400),
        ("/notify", b'{"resourceType": "Patient"}', 400),
        ("/notify", b'{"resourceType": "Bundle", "type": "history", "entry": []}', 400),
    ],
)
def test_malformed_bodies_are_400_operation_outcome(tmp_path: Path, path: str, body: bytes, status: int) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        method = client.put if path.count("/") > 1 else client.post
        r = await method(path, content=body, headers=AUTH)
        assert r.status_code == status
        assert r.json()["resourceType"] == "OperationOutcome"
        assert jobs(app) == []

    serve(tmp_path, test)


def test_oversized_body_is_413(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        big = orjson.dumps({**claim(), "text": {"status": "generated", "div": "x" * 5000}})
        r = await client.put("/notify/Claim/c9", content=big, headers=AUTH)
        assert r.status_code == 413 and r.json()["issue"][0]["code"] == "too-costly"

    serve(tmp_path, test, G0129_MAX_BODY_BYTES="1024")


def test_bodyless_post_queues_a_catch_up(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        for _ in range(2):
            r = await client.post("/notify", headers=AUTH)
            assert r.status_code == 200 and r.json()["resourceType"] == "OperationOutcome"
        assert jobs(app) == [("catch-up", "Subscription", "catch-up", "")]

    serve(tmp_path, test)


def test_backport_notifications_every_content_level(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        r = await client.post("/notify", content=backport("handshake", [], 0), headers=AUTH)
        assert r.status_code == 200 and r.json()["resourceType"] == "Bundle"
        assert jobs(app) == []
        await client.post("/notify", content=backport("event-notification", [(1, "Claim/c9")], 1), headers=AUTH)
        await client.post("/notify", content=backport("event-notification", [(2, "Encounter/e2")], 2, "id-only"), headers=AUTH)
        await client.post("/notify", content=backport("heartbeat", [], 2), headers=AUTH)
        assert jobs(app) == [("resource", "Claim", "c9", "7"), ("resource", "Encounter", "e2", "")]
        [full, id_only] = app.state.queue.list("pending")
        assert orjson.loads(full.payload)["id"] == "c9" and id_only.payload is None
        # empty content: something changed, find out by searching
        await client.post("/notify", content=backport("event-notification", [(3, "Claim/c9")], 3, "empty"), headers=AUTH)
        assert ("catch-up", "Subscription", "catch-up", "") in jobs(app)

    serve(tmp_path, test)


def test_event_number_gap_triggers_a_catch_up(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        await client.post("/notify", content=backport("event-notification", [(21, "Claim/a")], 21), headers=AUTH)
        assert not any(j[0] == "catch-up" for j in jobs(app))
        await client.post("/notify", content=backport("event-notification", [(23, "Claim/b")], 23), headers=AUTH)
        assert ("catch-up", "Subscription", "catch-up", "") in jobs(app)
        assert app.state.queue.last_event_number("Subscription/s1") == 23

    serve(tmp_path, test)


def test_heartbeat_reporting_more_events_than_seen_triggers_a_catch_up(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        await client.post("/notify", content=backport("event-notification", [(5, "Claim/a")], 5), headers=AUTH)
        await client.post("/notify", content=backport("heartbeat", [], 6), headers=AUTH)
        assert ("catch-up", "Subscription", "catch-up", "") in jobs(app)

    serve(tmp_path, test)


def test_r4b_and_r5_subscription_status_notifications(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        assert (await client.post("/notify", content=r5("handshake", None, 0), headers=AUTH)).status_code == 200
        await client.post("/notify", content=r5("event-notification", "Encounter/e5", 1), headers=AUTH)
        r4b = orjson.loads(r5("event-notification", "Procedure/p5", 2))
        r4b["type"] = "history"
        await client.post("/notify", content=orjson.dumps(r4b), headers=AUTH)
        assert jobs(app) == [("resource", "Encounter", "e5", ""), ("resource", "Procedure", "p5", "")]

    serve(tmp_path, test)


def test_accepted_notification_survives_a_crash_before_processing(tmp_path: Path) -> None:
    async def accept(client: httpx.AsyncClient, app: Any) -> None:
        r = await client.put("/notify/Claim/c9", content=orjson.dumps(claim()), headers=AUTH)
        assert r.status_code == 200

    async def after_restart(client: httpx.AsyncClient, app: Any) -> None:
        assert jobs(app) == [("resource", "Claim", "c9", "4")]
        assert "g0129_queue_pending 1.0" in (await client.get("/metrics")).text
        await client.put("/notify/Claim/c9", content=orjson.dumps(claim()), headers=AUTH)
        assert len(jobs(app)) == 1, "a redelivery after restart is still a duplicate"

    serve(tmp_path, accept)
    serve(tmp_path, after_restart)


def test_health_and_readiness(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        with respx.mock() as mock:
            mock.get(f"{BASE}/metadata").mock(side_effect=httpx.ConnectError("refused"))
            assert (await client.get("/healthz")).json() == {"status": "alive"}
            r = await client.get("/readyz")
            assert r.status_code == 503 and "FHIR server" in r.json()["problems"][0]
        with respx.mock() as mock:
            mock.get(f"{BASE}/metadata").respond(200, json={"resourceType": "CapabilityStatement"})
            assert (await client.get("/readyz")).status_code == 200

    serve(tmp_path, test)


def test_evaluate_endpoint_decides_and_writes_nothing(tmp_path: Path) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        r = await client.post("/$evaluate", content=GOOD.read_bytes())
        assert r.status_code == 200
        [decision] = r.json()["decisions"]
        assert decision["encounter"] == "Encounter/php01-enc" and decision["outcome"] == "bill"
        assert jobs(app) == []
        bad = await client.post("/$evaluate", content=b'{"resourceType": "Nope"}')
        assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"

    serve(tmp_path, test)


def test_end_to_end_notification_to_write_back(tmp_path: Path, fake: FakeFHIR) -> None:
    bundle = orjson.loads(GOOD.read_bytes())
    fake.load(*(e["resource"] for e in bundle["entry"]))

    async def test(client: httpx.AsyncClient, app: Any) -> None:
        encounter = fake.current("Encounter", "php01-enc")
        await client.put("/notify/Encounter/php01-enc", content=orjson.dumps(encounter), headers=AUTH)
        while await app.state.worker.run_once():
            pass
        assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "2"
        text = (await client.get("/metrics")).text
        assert 'g0129_decisions_total{outcome="bill"} 1.0' in text
        assert 'g0129_writebacks_total{result="updated"} 1.0' in text
        assert "g0129_queue_pending 0.0" in text
        assert "g0129_processing_latency_seconds_count 1.0" in text

    serve(tmp_path, test)
