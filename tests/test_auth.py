from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from adapter.auth import BearerAuth, SmartBackendAuth, auth_from_settings
from adapter.errors import AuthError, TransientFHIRError, UsageError
from adapter.settings import Settings

TOKEN_URL = "https://ehr.example/oauth2/token"
FHIR = "https://ehr.example/fhir"
CLIENT_ID = "g0129-adapter"
SCOPE = "system/Claim.rus"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP384R1())


class Clock:
    def __init__(self) -> None:
        # Starts at the real time so pyjwt's own exp/iat checks apply when decoding.
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def smart_auth(
    clock: Clock | None = None, key: bytes | None = None, alg: str = "RS384"
) -> SmartBackendAuth:
    return SmartBackendAuth(
        client_id=CLIENT_ID,
        token_url=TOKEN_URL,
        private_key=key or _pem(RSA_KEY),
        kid="key-1",
        alg=alg,  # type: ignore[arg-type]
        scope=SCOPE,
        clock=clock or time.time,
    )


def form(request: httpx.Request) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(request.content.decode()).items()}


def tokens(*values: str, expires_in: int = 300) -> list[httpx.Response]:
    return [
        httpx.Response(
            200, json={"access_token": v, "token_type": "bearer", "expires_in": expires_in}
        )
        for v in values
    ]


async def get(auth: httpx.Auth, times: int = 1) -> list[httpx.Response]:
    async with httpx.AsyncClient(auth=auth) as client:
        return [await client.get(f"{FHIR}/Claim/1") for _ in range(times)]


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


def test_bearer_auth_sets_the_header(mock: respx.MockRouter) -> None:
    route = mock.get(f"{FHIR}/Claim/1").respond(200, json={})

    asyncio.run(get(BearerAuth("static-token")))

    assert route.calls.last.request.headers["Authorization"] == "Bearer static-token"


def test_token_request_is_a_client_credentials_grant_with_a_signed_assertion(
    mock: respx.MockRouter,
) -> None:
    token = mock.post(TOKEN_URL).mock(side_effect=tokens("t1"))
    fhir = mock.get(f"{FHIR}/Claim/1").respond(200, json={})
    clock = Clock()

    asyncio.run(get(smart_auth(clock)))

    request = token.calls.last.request
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    body = form(request)
    assert body["grant_type"] == "client_credentials"
    assert body["scope"] == SCOPE
    assert body["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assertion = body["client_assertion"]
    assert jwt.get_unverified_header(assertion) == {"alg": "RS384", "kid": "key-1", "typ": "JWT"}
    claims = jwt.decode(assertion, RSA_KEY.public_key(), algorithms=["RS384"], audience=TOKEN_URL)
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == TOKEN_URL
    assert claims["iat"] == int(clock.now)
    assert int(clock.now) < claims["exp"] <= clock.now + 300
    assert fhir.calls.last.request.headers["Authorization"] == "Bearer t1"


def test_every_assertion_has_a_unique_jti() -> None:
    auth = smart_auth()
    jtis = {
        jwt.decode(
            auth.client_assertion(), RSA_KEY.public_key(), algorithms=["RS384"], audience=TOKEN_URL
        )["jti"]
        for _ in range(2)
    }
    assert len(jtis) == 2


def test_es384_assertion_verifies_with_the_ec_public_key(mock: respx.MockRouter) -> None:
    token = mock.post(TOKEN_URL).mock(side_effect=tokens("t1"))
    mock.get(f"{FHIR}/Claim/1").respond(200, json={})

    asyncio.run(get(smart_auth(key=_pem(EC_KEY), alg="ES384")))

    assertion = form(token.calls.last.request)["client_assertion"]
    assert jwt.get_unverified_header(assertion)["alg"] == "ES384"
    claims = jwt.decode(assertion, EC_KEY.public_key(), algorithms=["ES384"], audience=TOKEN_URL)
    assert claims["iss"] == CLIENT_ID


def test_token_is_cached_until_shortly_before_it_expires(mock: respx.MockRouter) -> None:
    token = mock.post(TOKEN_URL).mock(side_effect=tokens("t1", "t2", expires_in=300))
    fhir = mock.get(f"{FHIR}/Claim/1").respond(200, json={})
    clock = Clock()
    auth = smart_auth(clock)

    asyncio.run(get(auth, times=3))
    assert token.call_count == 1

    clock.now += 239  # renewal is due 60 s before the 300 s expiry
    asyncio.run(get(auth))
    assert token.call_count == 1

    clock.now += 1
    asyncio.run(get(auth))
    assert token.call_count == 2
    assert fhir.calls.last.request.headers["Authorization"] == "Bearer t2"


def test_a_401_re_authenticates_once_and_retries_once(mock: respx.MockRouter) -> None:
    token = mock.post(TOKEN_URL).mock(side_effect=tokens("stale", "fresh"))
    fhir = mock.get(f"{FHIR}/Claim/1").mock(
        side_effect=[httpx.Response(401), httpx.Response(200, json={"id": "1"})]
    )

    (response,) = asyncio.run(get(smart_auth()))

    assert response.status_code == 200
    assert token.call_count == 2
    assert [c.request.headers["Authorization"] for c in fhir.calls] == [
        "Bearer stale",
        "Bearer fresh",
    ]


def test_a_second_401_is_returned_not_retried_again(mock: respx.MockRouter) -> None:
    token = mock.post(TOKEN_URL).mock(side_effect=tokens("t1", "t2", "t3"))
    fhir = mock.get(f"{FHIR}/Claim/1").respond(401)

    (response,) = asyncio.run(get(smart_auth()))

    assert response.status_code == 401
    assert token.call_count == 2
    assert fhir.call_count == 2


def test_token_endpoint_400_is_an_auth_error_with_the_oauth_error(mock: respx.MockRouter) -> None:
    mock.post(TOKEN_URL).respond(
        400, json={"error": "invalid_client", "error_description": "unknown kid"}
    )

    with pytest.raises(AuthError, match="invalid_client unknown kid") as caught:
        asyncio.run(get(smart_auth()))
    assert caught.value.status == 400


def test_token_endpoint_without_access_token_is_an_auth_error(mock: respx.MockRouter) -> None:
    mock.post(TOKEN_URL).respond(200, json={"token_type": "bearer"})

    with pytest.raises(AuthError, match="without an access_token"):
        asyncio.run(get(smart_auth()))


def test_token_endpoint_503_is_transient(mock: respx.MockRouter) -> None:
    mock.post(TOKEN_URL).respond(503, headers={"Retry-After": "12"})

    with pytest.raises(TransientFHIRError) as caught:
        asyncio.run(get(smart_auth()))
    assert (caught.value.status, caught.value.retry_after) == (503, 12.0)


def test_sync_client_works_too(mock: respx.MockRouter) -> None:
    mock.post(TOKEN_URL).mock(side_effect=tokens("t1"))
    fhir = mock.get(f"{FHIR}/Claim/1").respond(200, json={})

    with httpx.Client(auth=smart_auth()) as client:
        client.get(f"{FHIR}/Claim/1")

    assert fhir.calls.last.request.headers["Authorization"] == "Bearer t1"


def test_a_key_that_does_not_suit_the_algorithm_fails_at_construction() -> None:
    with pytest.raises(UsageError, match="RS384"):
        smart_auth(key=_pem(EC_KEY), alg="RS384")
    with pytest.raises(UsageError, match="PEM"):
        smart_auth(key=b"not a key")
    with pytest.raises(UsageError, match=r"P-384|secp256r1"):
        smart_auth(key=_pem(ec.generate_private_key(ec.SECP256R1())), alg="ES384")


def test_auth_from_settings(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(_pem(RSA_KEY))
    smart = {
        "G0129_FHIR_AUTH": "smart",
        "G0129_SMART_CLIENT_ID": CLIENT_ID,
        "G0129_SMART_TOKEN_URL": TOKEN_URL,
        "G0129_SMART_PRIVATE_KEY": str(key),
        "G0129_SMART_KID": "key-1",
    }

    assert auth_from_settings(Settings.from_env({})) is None
    bearer = Settings.from_env({"G0129_FHIR_AUTH": "bearer", "G0129_FHIR_TOKEN": "t"})
    assert isinstance(auth_from_settings(bearer), BearerAuth)
    assert isinstance(auth_from_settings(Settings.from_env(smart)), SmartBackendAuth)

    missing = Settings.from_env({**smart, "G0129_SMART_PRIVATE_KEY": str(tmp_path / "nope.pem")})
    with pytest.raises(UsageError, match="G0129_SMART_PRIVATE_KEY"):
        auth_from_settings(missing)
    wrong = Settings.from_env({**smart, "G0129_SMART_ALG": "ES384"})
    with pytest.raises(UsageError, match="G0129_SMART_PRIVATE_KEY"):
        auth_from_settings(wrong)
