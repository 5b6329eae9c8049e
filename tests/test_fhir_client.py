from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from adapter.auth import BearerAuth, SmartBackendAuth
from adapter.errors import (
    AuthError,
    FatalFHIRError,
    InvalidResource,
    TransientFHIRError,
    UsageError,
    VersionConflict,
)
from adapter.fhir_client import FHIRClient, FHIRResponse
from adapter.retry import RetryPolicy
from adapter.settings import Settings

BASE = "http://hapi.test/fhir"
CLAIM = {"resourceType": "Claim", "id": "c9", "meta": {"versionId": "3"}, "status": "active"}
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }


def run(
    call: Callable[[FHIRClient], Awaitable[Any]],
    policy: RetryPolicy | None = None,
    auth: httpx.Auth | None = None,
) -> tuple[Any, list[float]]:
    """Run one client call; returns its result and the backoff delays it slept."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> Any:
        async with FHIRClient(
            BASE, auth=auth, retry=policy or RetryPolicy(max_attempts=4), sleep=sleep
        ) as client:
            return await call(client)

    return asyncio.run(main()), slept


def fail(
    call: Callable[[FHIRClient], Awaitable[Any]],
    error: type[Exception],
    policy: RetryPolicy | None = None,
) -> tuple[Any, list[float]]:
    """Run a call that must raise `error`; returns the error and the delays slept."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> None:
        async with FHIRClient(
            BASE, retry=policy or RetryPolicy(max_attempts=4), sleep=sleep
        ) as client:
            await call(client)

    with pytest.raises(error) as caught:
        asyncio.run(main())
    return caught.value, slept


@pytest.fixture
def fhir() -> Iterator[respx.MockRouter]:
    # assert_all_mocked (respx's default) fails any request no route expects.
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


# --- reads ---------------------------------------------------------------------------------


def test_read_returns_the_resource_status_and_version(fhir: respx.MockRouter) -> None:
    route = fhir.get("/Claim/c9").respond(200, json=CLAIM, headers={"ETag": 'W/"3"'})

    response, _ = run(lambda c: c.read("Claim", "c9"))

    assert response == FHIRResponse(200, CLAIM, etag='W/"3"')
    assert response.version_id == "3"
    assert route.calls.last.request.headers["Accept"] == "application/fhir+json"


def test_version_id_falls_back_to_meta_then_location() -> None:
    assert FHIRResponse(200, CLAIM).version_id == "3"
    assert FHIRResponse(201, None, location=f"{BASE}/Claim/c9/_history/4").version_id == "4"
    assert FHIRResponse(200, {"resourceType": "Claim"}).version_id is None


def test_vread(fhir: respx.MockRouter) -> None:
    fhir.get("/Claim/c9/_history/2").respond(200, json={**CLAIM, "meta": {"versionId": "2"}})

    response, _ = run(lambda c: c.vread("Claim", "c9", "2"))

    assert response.version_id == "2"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.read("Claim", "../Patient/1"),
        lambda c: c.read("claim", "c9"),
        lambda c: c.read("Claim", ".."),
        lambda c: c.vread("Claim", "c9", "1 OR 1"),
    ],
)
def test_ids_and_types_are_checked_before_they_reach_a_url(
    fhir: respx.MockRouter, call: Callable[[FHIRClient], Awaitable[Any]]
) -> None:
    fail(call, InvalidResource)  # and no request went out: nothing is mocked


def test_capabilities(fhir: respx.MockRouter) -> None:
    fhir.get("/metadata").respond(
        200, json={"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"}
    )

    statement, _ = run(lambda c: c.capabilities())

    assert statement["fhirVersion"] == "4.0.1"


def test_capabilities_that_are_not_a_capability_statement_fail(fhir: respx.MockRouter) -> None:
    fhir.get("/metadata").respond(200, text="<html>login</html>")

    error, _ = fail(lambda c: c.capabilities(), FatalFHIRError)

    assert "not JSON" in str(error)


# --- search and paging ---------------------------------------------------------------------


def bundle(entries: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "self", "url": f"{BASE}/Claim"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries}


def entry(resource_type: str, resource_id: str, mode: str = "match") -> dict[str, Any]:
    return {
        "fullUrl": f"{BASE}/{resource_type}/{resource_id}",
        "resource": {"resourceType": resource_type, "id": resource_id},
        "search": {"mode": mode},
    }


def test_search_follows_next_links_and_leaves_includes_out(fhir: respx.MockRouter) -> None:
    first = fhir.get("/Claim", params={"status": "active", "_include": "Claim:patient"}).respond(
        200,
        json=bundle(
            [entry("Claim", "a"), entry("Patient", "p", mode="include")],
            next_url=f"{BASE}?_getpages=abc&_getpagesoffset=1",
        ),
    )
    second = fhir.get("", params={"_getpages": "abc", "_getpagesoffset": "1"}).respond(
        200, json=bundle([entry("Claim", "b")])
    )
    params = [("status", "active"), ("_include", "Claim:patient")]

    claims, _ = run(lambda c: c.search("Claim", params))
    entries, _ = run(lambda c: c.search_entries("Claim", params))

    assert [r["id"] for r in claims] == ["a", "b"]
    assert [(e["resource"]["id"], e["search"]["mode"]) for e in entries] == [
        ("a", "match"),
        ("p", "include"),
        ("b", "match"),
    ]
    assert first.call_count == second.call_count == 2


def test_paging_never_follows_a_link_to_another_server(fhir: respx.MockRouter) -> None:
    fhir.get("/Claim").respond(
        200, json=bundle([entry("Claim", "a")], next_url="http://evil.test/fhir?p=2")
    )

    error, _ = fail(lambda c: c.search("Claim", {}), FatalFHIRError)

    assert "evil.test" in str(error)


def test_paging_that_loops_is_an_error(fhir: respx.MockRouter) -> None:
    fhir.get("/Claim").respond(200, json=bundle([], next_url=f"{BASE}/Claim?page=2"))

    fail(lambda c: c.search("Claim", {}), FatalFHIRError)


def test_search_answer_must_be_a_bundle(fhir: respx.MockRouter) -> None:
    fhir.get("/Claim").respond(200, json=CLAIM)

    fail(lambda c: c.search("Claim", {}), FatalFHIRError)


# --- writes --------------------------------------------------------------------------------


def test_conditional_create_sends_if_none_exist(fhir: respx.MockRouter) -> None:
    route = fhir.post("/Provenance").respond(
        201,
        json={"resourceType": "Provenance", "id": "pv1", "meta": {"versionId": "1"}},
        headers={"Location": f"{BASE}/Provenance/pv1/_history/1", "ETag": 'W/"1"'},
    )
    resource = {
        "resourceType": "Provenance",
        "identifier": [{"system": "urn:g0129", "value": "d1"}],
    }

    response, _ = run(lambda c: c.create(resource, if_none_exist="?identifier=urn:g0129|d1"))

    request = route.calls.last.request
    assert request.headers["If-None-Exist"] == "identifier=urn:g0129|d1"
    assert request.headers["Content-Type"] == "application/fhir+json"
    assert orjson.loads(request.content) == resource
    assert (response.status, response.version_id, response.location) == (
        201,
        "1",
        f"{BASE}/Provenance/pv1/_history/1",
    )


def test_plain_create_sends_no_condition(fhir: respx.MockRouter) -> None:
    route = fhir.post("/Provenance").respond(201)

    response, _ = run(lambda c: c.create({"resourceType": "Provenance"}))

    assert "If-None-Exist" not in route.calls.last.request.headers
    assert response.resource is None


def test_update_sends_a_weak_if_match(fhir: respx.MockRouter) -> None:
    route = fhir.put("/Claim/c9").respond(
        200, json={**CLAIM, "meta": {"versionId": "4"}}, headers={"ETag": 'W/"4"'}
    )

    response, _ = run(lambda c: c.update(CLAIM, if_match="3"))

    assert route.calls.last.request.headers["If-Match"] == 'W/"3"'
    assert response.version_id == "4"


def test_update_without_if_match_or_id(fhir: respx.MockRouter) -> None:
    route = fhir.put("/Claim/c9").respond(200, json=CLAIM)

    run(lambda c: c.update(CLAIM))

    assert "If-Match" not in route.calls.last.request.headers
    fail(lambda c: c.update({"resourceType": "Claim"}), InvalidResource)


@pytest.mark.parametrize("status", [409, 412])
def test_version_conflicts(fhir: respx.MockRouter, status: int) -> None:
    route = fhir.put("/Claim/c9").respond(
        status,
        json=outcome(
            "HAPI-0989: Trying to update Claim/c9/_history/3 but this is not the current version"
        ),
    )

    error, slept = fail(lambda c: c.update(CLAIM, if_match="3"), VersionConflict)

    assert error.status == status
    assert "HAPI-0989" in str(error)
    assert route.call_count == 1 and slept == []


def test_transaction_posts_to_the_base(fhir: respx.MockRouter) -> None:
    route = fhir.post("").respond(
        200, json={"resourceType": "Bundle", "type": "transaction-response"}
    )
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": []}

    answer, _ = run(lambda c: c.transaction(tx))

    assert answer["type"] == "transaction-response"
    assert str(route.calls.last.request.url) == BASE
    fail(lambda c: c.transaction({"resourceType": "Bundle", "type": "batch"}), InvalidResource)


# --- retries -------------------------------------------------------------------------------


def test_429_honours_retry_after_then_succeeds(fhir: respx.MockRouter) -> None:
    route = fhir.get("/Claim/c9").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}),
            httpx.Response(200, json=CLAIM),
        ]
    )

    response, slept = run(lambda c: c.read("Claim", "c9"))

    assert response.resource == CLAIM
    assert slept == [7.0]
    assert route.call_count == 2


def test_retry_after_is_capped(fhir: respx.MockRouter) -> None:
    fhir.get("/Claim/c9").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "86400"}),
            httpx.Response(200, json=CLAIM),
        ]
    )

    _, slept = run(lambda c: c.read("Claim", "c9"), policy=RetryPolicy(retry_after_cap=30.0))

    assert slept == [30.0]


def test_503_then_success_backs_off_with_jitter(fhir: respx.MockRouter) -> None:
    fhir.get("/Claim/c9").mock(
        side_effect=[httpx.Response(503), httpx.Response(503), httpx.Response(200, json=CLAIM)]
    )
    policy = RetryPolicy(base_delay=1.0, factor=2.0, jitter=0.25)

    response, slept = run(lambda c: c.read("Claim", "c9"), policy=policy)

    assert response.status == 200
    assert len(slept) == 2
    assert 0.75 <= slept[0] <= 1.25 and 1.5 <= slept[1] <= 2.5


def test_timeouts_are_retried_then_transient(fhir: respx.MockRouter) -> None:
    route = fhir.get("/Claim/c9").mock(side_effect=httpx.ReadTimeout("read timed out"))

    error, slept = fail(
        lambda c: c.read("Claim", "c9"), TransientFHIRError, RetryPolicy(max_attempts=3)
    )

    assert route.call_count == 3
    assert len(slept) == 2
    assert error.status is None
    assert isinstance(error.__cause__, httpx.ReadTimeout)
    assert "ReadTimeout" in str(error)


def test_5xx_exhausted_is_transient_with_retry_after(fhir: respx.MockRouter) -> None:
    route = fhir.get("/Claim/c9").respond(
        503, headers={"Retry-After": "5"}, json=outcome("maintenance")
    )

    error, slept = fail(lambda c: c.read("Claim", "c9"), TransientFHIRError)

    assert route.call_count == 4
    assert slept == [5.0, 5.0, 5.0]
    assert (error.status, error.retry_after) == (503, 5.0)
    assert "maintenance" in str(error)


@pytest.mark.parametrize(
    ("status", "text"), [(404, "HAPI-2001: Resource Claim/c9 is not known"), (400, "bad param")]
)
def test_other_4xx_are_fatal_not_retried_and_carry_the_outcome(
    fhir: respx.MockRouter, status: int, text: str
) -> None:
    route = fhir.get("/Claim/c9").respond(status, json=outcome(text), headers=FHIR_JSON)

    error, slept = fail(lambda c: c.read("Claim", "c9"), FatalFHIRError)

    assert type(error) is FatalFHIRError
    assert error.status == status
    assert text in str(error)
    assert route.call_count == 1 and slept == []


def test_outcome_details_text_is_used_without_diagnostics(fhir: respx.MockRouter) -> None:
    fhir.get("/Claim/c9").respond(
        422,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "details": {"text": "no"}}],
        },
    )

    error, _ = fail(lambda c: c.read("Claim", "c9"), FatalFHIRError)

    assert str(error).endswith("answered 422: no")


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_auth_errors(fhir: respx.MockRouter, status: int) -> None:
    route = fhir.get("/Claim/c9").respond(status)

    with pytest.raises(AuthError):
        run(lambda c: c.read("Claim", "c9"), auth=BearerAuth("revoked"))
    assert route.call_count == 1


def test_plain_create_is_not_resent_after_an_ambiguous_failure(fhir: respx.MockRouter) -> None:
    route = fhir.post("/Provenance").mock(side_effect=httpx.ReadTimeout("slow"))

    fail(lambda c: c.create({"resourceType": "Provenance"}), TransientFHIRError)

    assert route.call_count == 1


def test_non_idempotent_calls_are_resent_when_nothing_was_processed(fhir: respx.MockRouter) -> None:
    route = fhir.post("").mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.Response(503),
            httpx.Response(200, json={"resourceType": "Bundle", "type": "transaction-response"}),
        ]
    )

    _, slept = run(lambda c: c.transaction({"resourceType": "Bundle", "type": "transaction"}))

    assert route.call_count == 3 and len(slept) == 2


def test_transaction_500_is_not_resent(fhir: respx.MockRouter) -> None:
    route = fhir.post("").respond(500)

    fail(
        lambda c: c.transaction({"resourceType": "Bundle", "type": "transaction"}),
        TransientFHIRError,
    )

    assert route.call_count == 1


def test_conditional_create_is_resent_after_a_timeout(fhir: respx.MockRouter) -> None:
    route = fhir.post("/Provenance").mock(
        side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200)]
    )

    response, _ = run(
        lambda c: c.create({"resourceType": "Provenance"}, if_none_exist="identifier=x|1")
    )

    assert response.status == 200 and route.call_count == 2


# --- construction --------------------------------------------------------------------------


def test_from_settings_needs_a_base_url() -> None:
    with pytest.raises(UsageError, match="G0129_FHIR_BASE_URL"):
        FHIRClient.from_settings(Settings())


def test_from_settings_uses_auth_and_base_url(fhir: respx.MockRouter) -> None:
    route = fhir.get("/metadata").respond(200, json={"resourceType": "CapabilityStatement"})
    settings = Settings.from_env(
        {"G0129_FHIR_BASE_URL": BASE + "/", "G0129_FHIR_AUTH": "bearer", "G0129_FHIR_TOKEN": "tok"}
    )

    async def main() -> None:
        async with FHIRClient.from_settings(settings) as client:
            assert client.base_url == BASE
            await client.capabilities()

    asyncio.run(main())

    assert route.calls.last.request.headers["Authorization"] == "Bearer tok"


def test_smart_auth_end_to_end(fhir: respx.MockRouter) -> None:
    key = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    auth = SmartBackendAuth(
        client_id="g0129",
        token_url=f"{BASE}/auth/token",
        private_key=key,
        kid="k1",
        alg="ES384",
        scope="system/Claim.rus",
    )
    token = fhir.post("/auth/token").mock(
        side_effect=[
            httpx.Response(200, json={"access_token": "t1", "expires_in": 300}),
            httpx.Response(200, json={"access_token": "t2", "expires_in": 300}),
            httpx.Response(400, json={"error": "invalid_client"}),
        ]
    )
    claim = fhir.get("/Claim/c9").mock(
        side_effect=[
            httpx.Response(200, json=CLAIM),
            httpx.Response(401),
            httpx.Response(403),
            httpx.Response(401),
        ]
    )

    async def main() -> None:
        async with FHIRClient(BASE, auth=auth) as client:
            await client.read("Claim", "c9")  # first token
            with pytest.raises(AuthError) as refused:  # 401, new token, then 403: final
                await client.read("Claim", "c9")
            assert refused.value.status == 403
            with pytest.raises(AuthError, match="invalid_client"):  # 401, token refused
                await client.read("Claim", "c9")

    asyncio.run(main())

    assert token.call_count == 3
    assert claim.call_count == 4


# --- send and download ---------------------------------------------------------------------


def test_download_streams_to_disk_chunk_by_chunk_and_starts_again_on_a_retry(tmp_path: Path) -> None:
    target = tmp_path / "Patient.ndjson"
    on_disk: list[int] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for n in range(3):
                on_disk.append(target.stat().st_size)  # what was written before this chunk came
                yield bytes([ord("a") + n]) * 65536

    answers = iter([httpx.Response(503), httpx.Response(200, stream=Body())])
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(answers)

    async def main() -> int:
        async def no_sleep(_: float) -> None:
            pass

        transport = httpx.MockTransport(handler)
        async with FHIRClient(BASE, auth=BearerAuth("tok"), transport=transport, sleep=no_sleep) as client:
            return await client.download(f"{BASE}/Binary/p", target, headers={"Accept": "application/fhir+ndjson"})

    assert asyncio.run(main()) == 3 * 65536
    assert on_disk == [0, 65536, 2 * 65536], "each chunk is on disk before the next arrives"
    assert target.read_bytes() == b"a" * 65536 + b"b" * 65536 + b"c" * 65536
    assert [r.headers["Authorization"] for r in seen] == ["Bearer tok"] * 2


def test_send_and_download_keep_our_credentials_on_our_server(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202 if request.url.path.endswith("$export") else 200, content=b"{}\n")

    async def main() -> None:
        async with FHIRClient(BASE, auth=BearerAuth("tok"), transport=httpx.MockTransport(handler)) as client:
            await client.send("GET", "$export", headers={"Prefer": "respond-async"})
            with pytest.raises(FatalFHIRError, match="not sending our credentials there"):
                await client.send("GET", "https://files.example.com/p.ndjson")
            with pytest.raises(FatalFHIRError, match="not sending our credentials there"):
                await client.download("https://files.example.com/p.ndjson", tmp_path / "p")
            assert await client.download("https://files.example.com/p.ndjson", tmp_path / "p", authenticate=False) == 3

    asyncio.run(main())

    assert [(str(r.url), r.headers.get("Authorization")) for r in seen] == [
        (f"{BASE}/$export", "Bearer tok"),
        ("https://files.example.com/p.ndjson", None),
    ]
    assert seen[0].headers["Prefer"] == "respond-async"
