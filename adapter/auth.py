"""How we authenticate to the FHIR server: a static bearer token or SMART Backend Services.

Both are `httpx.Auth` flows, so they work with the sync and the async client alike: the token
request is yielded from the flow and goes out through the same client (and transport) as the
FHIR request it serves.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from adapter.errors import AuthError, TransientFHIRError, UsageError
from adapter.retry import RETRYABLE_STATUSES, parse_retry_after

if TYPE_CHECKING:
    from adapter.settings import Settings

__all__ = ["BearerAuth", "SmartBackendAuth", "auth_from_settings"]

log = logging.getLogger(__name__)

_CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Epic rejects assertions that live longer than 5 minutes; stay well inside that.
_ASSERTION_LIFETIME = 240
# Used when a token endpoint leaves `expires_in` out (SMART says it SHALL send it).
_DEFAULT_EXPIRES_IN = 300.0
# Renew this long before the server's expiry, so clock skew and slow requests never carry an
# expired token. Short-lived tokens renew at half their life instead.
_RENEW_MARGIN = 60.0


class BearerAuth(httpx.Auth):
    """A static bearer token (`G0129_FHIR_AUTH=bearer`); a 401 is final."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    renew_at: float


class SmartBackendAuth(httpx.Auth):
    """SMART Backend Services: client-credentials grant with a signed JWT client assertion.

    The access token is cached until shortly before it expires. A 401 from the FHIR server
    (token revoked, or expired early) gets one new token and one retry of the request.
    Concurrent requests on a cold cache may each fetch a token; every one of them is valid, and
    it saves holding a lock across network I/O.
    """

    # The token response must be read inside the flow.
    requires_response_body = True

    def __init__(
        self,
        *,
        client_id: str,
        token_url: str,
        private_key: bytes,
        kid: str,
        alg: Literal["RS384", "ES384"] = "RS384",
        scope: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client_id = client_id
        self._token_url = token_url
        self._key = _load_signing_key(private_key, alg)
        self._kid = kid
        self._alg = alg
        self._scope = scope
        self._clock = clock
        self._token: _Token | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._token is None or self._clock() >= self._token.renew_at:
            self._token = self._parse_token((yield self._token_request()))
        request.headers["Authorization"] = f"Bearer {self._token.value}"
        response = yield request
        if response.status_code != 401:
            return
        log.info("FHIR server answered 401; fetching a new SMART access token and retrying once")
        self._token = self._parse_token((yield self._token_request()))
        request.headers["Authorization"] = f"Bearer {self._token.value}"
        yield request

    def client_assertion(self) -> str:
        """A fresh signed JWT that identifies us to the token endpoint."""
        now = int(self._clock())
        claims = {
            "iss": self._client_id,
            "sub": self._client_id,
            "aud": self._token_url,
            "iat": now,
            "exp": now + _ASSERTION_LIFETIME,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            claims, self._key, algorithm=self._alg, headers={"kid": self._kid, "typ": "JWT"}
        )

    def _token_request(self) -> httpx.Request:
        return httpx.Request(
            "POST",
            self._token_url,
            headers={"Accept": "application/json"},
            data={
                "grant_type": "client_credentials",
                "scope": self._scope,
                "client_assertion_type": _CLIENT_ASSERTION_TYPE,
                "client_assertion": self.client_assertion(),
            },
        )

    def _parse_token(self, response: httpx.Response) -> _Token:
        where = f"SMART token endpoint {self._token_url}"
        if response.status_code in RETRYABLE_STATUSES:
            raise TransientFHIRError(
                f"{where} answered {response.status_code}",
                status=response.status_code,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        body = _json_object(response)
        if not response.is_success:
            # RFC 6749 section 5.2: `error` is a code such as invalid_client, plus an optional text.
            detail = " ".join(
                str(body[key]) for key in ("error", "error_description") if body.get(key)
            )
            raise AuthError(
                f"{where} refused our client assertion ({response.status_code})"
                + (f": {detail}" if detail else ""),
                status=response.status_code,
            )
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise AuthError(
                f"{where} answered without an access_token", status=response.status_code
            )
        expires_in = body.get("expires_in", _DEFAULT_EXPIRES_IN)
        if not isinstance(expires_in, (int, float)) or expires_in <= 0:
            raise AuthError(f"{where} sent a bad expires_in: {expires_in!r}")
        lifetime = max(expires_in - _RENEW_MARGIN, expires_in / 2)
        return _Token(access_token, self._clock() + lifetime)


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _load_signing_key(pem: bytes, alg: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """Load the key now, so a wrong or mismatched key fails at start-up, not at the first call."""
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"SMART private key is not an unencrypted PEM private key: {exc}"
        ) from None
    if alg == "RS384" and isinstance(key, rsa.RSAPrivateKey):
        return key
    if alg == "ES384" and isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise UsageError(f"ES384 needs a P-384 key, got {key.curve.name}")
        return key
    raise UsageError(f"SMART private key does not suit {alg} (got {type(key).__name__})")


def auth_from_settings(settings: Settings) -> httpx.Auth | None:
    """The auth flow `G0129_FHIR_AUTH` asks for, or None for `none`."""
    # Settings refuses to exist with a mode whose variables are missing, hence the asserts.
    if settings.fhir_auth == "bearer":
        assert settings.fhir_token is not None
        return BearerAuth(settings.fhir_token)
    if settings.fhir_auth == "smart":
        assert settings.smart_private_key is not None
        assert settings.smart_client_id and settings.smart_token_url and settings.smart_kid
        path = settings.smart_private_key
        try:
            return SmartBackendAuth(
                client_id=settings.smart_client_id,
                token_url=settings.smart_token_url,
                private_key=path.read_bytes(),
                kid=settings.smart_kid,
                alg=settings.smart_alg,
                scope=settings.smart_scope,
            )
        except OSError as exc:
            raise UsageError(
                f"G0129_SMART_PRIVATE_KEY: cannot read {path}: {exc.strerror}"
            ) from None
        except UsageError as exc:
            raise UsageError(f"G0129_SMART_PRIVATE_KEY ({path}): {exc}") from None
    return None
