"""A small async FHIR R4 REST client: the adapter's only door to a FHIR server.

Resources go in and come out as plain `dict`s (raw JSON), so a write-back never drops elements
our models do not know. Every call retries transient failures per `RetryPolicy` and maps what
is left onto `adapter.errors`:

    network error, timeout, 429, 500/502/503/504  -> TransientFHIRError (after retries)
    401, 403 (after one re-authentication)        -> AuthError
    409, 412                                      -> VersionConflict
    any other non-2xx                             -> FatalFHIRError, with OperationOutcome text
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from adapter import jsonio
from adapter.auth import auth_from_settings
from adapter.errors import (
    AuthError,
    FatalFHIRError,
    FHIRError,
    InvalidResource,
    TransientFHIRError,
    UsageError,
    VersionConflict,
)
from adapter.retry import RetryPolicy, parse_retry_after
from adapter.settings import Settings

__all__ = ["FHIRClient", "FHIRResponse", "SearchParams", "outcome_text"]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

# Repeated keys are common in FHIR searches (`_include`, `_lastUpdated=gt..&_lastUpdated=lt..`),
# hence pairs as well as a mapping.
SearchParams = Mapping[str, str] | Sequence[tuple[str, str]]

# FHIR R4 `id` and resource-type grammars. Ids arrive in webhook URLs, so they are checked
# before they become part of a request path; "." and ".." fit the grammar but are path segments.
_ID = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9\-.]{1,64}")
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_WEAK_ETAG = re.compile(r'^(?:W/)?"([^"]+)"$')

# Failures after which a non-idempotent request surely did not reach the server's storage,
# so sending it again cannot write twice.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_NOT_PROCESSED = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class FHIRResponse:
    """One resource-level answer: its status, body (None if the server sent none) and headers."""

    status: int
    resource: dict[str, Any] | None
    etag: str | None = None
    location: str | None = None

    @property
    def version_id(self) -> str | None:
        """The resource version, from the ETag, else `meta.versionId`, else the Location."""
        if self.etag and (match := _WEAK_ETAG.match(self.etag)):
            return match.group(1)
        if self.resource is not None:
            version = self.resource.get("meta", {}).get("versionId")
            if isinstance(version, str):
                return version
        if self.location and "/_history/" in self.location:
            return self.location.rsplit("/_history/", 1)[1].strip("/") or None
        return None


class FHIRClient:
    """Async client for one FHIR R4 base URL, over one `httpx.AsyncClient`.

    Use it as an async context manager, or call `aclose()`. `transport` is the test seam (an
    `httpx.MockTransport` or `httpx.ASGITransport`); `sleep` lets tests skip the backoff waits.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_retry: Callable[[FHIRError], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        # Told of every retried failure (the service counts them in /metrics).
        self._on_retry = on_retry
        self._http = httpx.AsyncClient(
            auth=auth,
            timeout=timeout,
            transport=transport,
            headers={"Accept": FHIR_JSON, "User-Agent": "g0129-adapter"},
            # A FHIR server has no business redirecting API calls; following one could send our
            # token elsewhere.
            follow_redirects=False,
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        on_retry: Callable[[FHIRError], None] | None = None,
    ) -> FHIRClient:
        if settings.fhir_base_url is None:
            raise UsageError("G0129_FHIR_BASE_URL must be set to talk to a FHIR server")
        return cls(
            settings.fhir_base_url,
            auth=auth_from_settings(settings),
            timeout=timeout if timeout is not None else settings.http_timeout,
            retry=retry or settings.http_retry_policy(),
            transport=transport,
            on_retry=on_retry,
        )

    async def __aenter__(self) -> FHIRClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def read(self, resource_type: str, resource_id: str) -> FHIRResponse:
        """GET `[base]/{type}/{id}`."""
        return _resource_response(await self._request("GET", self._url(resource_type, resource_id)))

    async def vread(self, resource_type: str, resource_id: str, version_id: str) -> FHIRResponse:
        """GET `[base]/{type}/{id}/_history/{vid}`."""
        url = f"{self._url(resource_type, resource_id)}/_history/{_checked_id(version_id)}"
        return _resource_response(await self._request("GET", url))

    async def search(self, resource_type: str, params: SearchParams) -> list[dict[str, Any]]:
        """Every resource matching a search, across all pages (`_include`d ones left out)."""
        return [
            entry["resource"]
            for entry in await self.search_entries(resource_type, params)
            if "resource" in entry and entry.get("search", {}).get("mode", "match") == "match"
        ]

    async def search_entries(
        self, resource_type: str, params: SearchParams
    ) -> list[dict[str, Any]]:
        """Every Bundle entry of a search, across all pages, `search.mode` included."""
        entries: list[dict[str, Any]] = []
        response = await self._request("GET", self._url(resource_type), params=params)
        seen: set[str] = set()
        while True:
            bundle = _json(response)
            if bundle.get("resourceType") != "Bundle":
                raise FatalFHIRError(f"search {resource_type} did not answer with a Bundle")
            entries.extend(bundle.get("entry", []))
            next_url = _next_link(bundle)
            if next_url is None:
                return entries
            if next_url in seen:
                raise FatalFHIRError(f"search {resource_type}: paging loops back to {next_url}")
            seen.add(next_url)
            response = await self._request("GET", self._page_url(next_url))

    async def create(
        self, resource: Mapping[str, Any], if_none_exist: str | None = None
    ) -> FHIRResponse:
        """POST a new resource; with `if_none_exist` (a search query such as
        `identifier=sys|v`), a conditional create that answers 200 if one already matches."""
        headers = {"Prefer": "return=representation"}
        if if_none_exist is not None:
            headers["If-None-Exist"] = if_none_exist.lstrip("?")
        response = await self._request(
            "POST",
            self._url(_resource_type(resource)),
            json_body=resource,
            headers=headers,
            idempotent=if_none_exist is not None,
        )
        return _resource_response(response)

    async def update(
        self, resource: Mapping[str, Any], if_match: str | None = None
    ) -> FHIRResponse:
        """PUT a resource at its id; with `if_match` (a versionId such as `"3"`), only if the
        server still holds that version, else `VersionConflict`."""
        resource_id = resource.get("id")
        if not isinstance(resource_id, str):
            raise InvalidResource("cannot update a resource without an id")
        headers = {"Prefer": "return=representation"}
        if if_match is not None:
            headers["If-Match"] = f'W/"{if_match}"'
        response = await self._request(
            "PUT",
            self._url(_resource_type(resource), resource_id),
            json_body=resource,
            headers=headers,
        )
        return _resource_response(response)

    async def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle; returns the transaction-response Bundle.

        Only failures that prove nothing was written are retried here. After a timeout or a
        500 the server may have committed, so the caller must re-read before trying again.
        """
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise InvalidResource("not a transaction Bundle")
        return _json(await self._request("POST", self.base_url, json_body=bundle, idempotent=False))

    async def batch(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """POST a batch Bundle; returns the batch-response Bundle.

        A batch of GETs changes nothing, so it is retried like a read; one with writes is
        retried only when nothing can have been written, as a transaction is.
        """
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "batch":
            raise InvalidResource("not a batch Bundle")
        reads_only = all(
            isinstance(e, Mapping) and (e.get("request") or {}).get("method") == "GET" for e in bundle.get("entry") or ()
        )
        return _json(await self._request("POST", self.base_url, json_body=bundle, idempotent=reads_only))

    async def send(
        self,
        method: str,
        url: str,
        *,
        params: SearchParams | None = None,
        headers: Mapping[str, str] | None = None,
        authenticate: bool = True,
    ) -> httpx.Response:
        """One request to a URL of this server's origin (an operation, a status URL a server
        handed out), with the same retries and error mapping as every other call. Only GET and
        DELETE, which are idempotent. `authenticate=False` sends no credentials."""
        if method not in ("GET", "DELETE"):
            raise ValueError(f"send() is for GET and DELETE, not {method}")
        return await self._request(
            method, self._own_url(url), params=params, headers=dict(headers or {}), authenticate=authenticate
        )

    async def download(
        self, url: str, path: Path, *, headers: Mapping[str, str] | None = None, authenticate: bool = True
    ) -> int:
        """GET `url` into the file `path`, streamed (never the whole body in memory); the number
        of bytes written. A retried download starts the file again. With credentials, only a
        URL of this server's origin; without (`authenticate=False`), any http(s) URL, such as
        the signed URLs some servers hand out for Bulk Data files."""
        written = 0

        async def to_file(response: httpx.Response) -> None:
            nonlocal written
            written = 0
            with path.open("wb") as sink:
                async for chunk in response.aiter_bytes():
                    sink.write(chunk)
                    written += len(chunk)
                sink.flush()
                os.fsync(sink.fileno())

        target = self._own_url(url) if authenticate else url
        await self._request("GET", target, headers=dict(headers or {}), authenticate=authenticate, consume=to_file)
        return written

    async def capabilities(self) -> dict[str, Any]:
        """GET `[base]/metadata`: the CapabilityStatement, which also proves the server is up."""
        statement = _json(await self._request("GET", f"{self.base_url}/metadata"))
        if statement.get("resourceType") != "CapabilityStatement":
            raise FatalFHIRError(f"{self.base_url}/metadata is not a CapabilityStatement")
        return statement

    def _url(self, resource_type: str, resource_id: str | None = None) -> str:
        if not _TYPE.fullmatch(resource_type):
            raise InvalidResource(f"not a FHIR resource type: {resource_type!r}")
        if resource_id is None:
            return f"{self.base_url}/{resource_type}"
        return f"{self.base_url}/{resource_type}/{_checked_id(resource_id)}"

    def _own_url(self, url: str) -> str:
        """`url`, absolute or relative to the base, when it is on this server's origin: our
        credentials go nowhere else."""
        if not url.startswith(("http://", "https://")):
            return f"{self.base_url}/{url.lstrip('/')}"
        if _origin(url) != _origin(self.base_url):
            raise FatalFHIRError(f"{url} is not on {self.base_url}'s server; not sending our credentials there")
        return url

    def _page_url(self, url: str) -> str:
        # Paging links are absolute; one pointing off our server would carry our token there.
        if url == self.base_url or url.startswith((f"{self.base_url}/", f"{self.base_url}?")):
            return url
        raise FatalFHIRError(f"search paging link leaves {self.base_url}: {url}")

    async def _request(
        self,
        method: str,
        url: str,
        *,
        params: SearchParams | None = None,
        json_body: Mapping[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        idempotent: bool = True,
        authenticate: bool = True,
        consume: Callable[[httpx.Response], Awaitable[None]] | None = None,
    ) -> httpx.Response:
        """Send one request, retrying what the policy allows; raise the mapped error.

        `consume` reads a successful answer's body as it streams in (it is then not kept);
        any other body is read whole, for its OperationOutcome."""
        headers = dict(headers or {})
        # A tuple of pairs: the one shape httpx takes for both of ours, repeated keys intact.
        query = None
        if params is not None:
            query = tuple(params.items() if isinstance(params, Mapping) else params)
        content = None
        if json_body is not None:
            content = jsonio.dumps(json_body)
            headers["Content-Type"] = FHIR_JSON
        attempt = 0
        while True:
            attempt += 1
            try:
                request = self._http.build_request(method, url, params=query, content=content, headers=headers)
                response = await self._send(request, authenticate, consume)
            except httpx.UnsupportedProtocol as exc:
                raise FatalFHIRError(f"{method} {url}: {exc}") from exc
            except httpx.TransportError as exc:
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                error: FHIRError = TransientFHIRError(f"{method} {url}: {detail}")
                error.__cause__ = exc
                retryable = idempotent or isinstance(exc, _NOT_SENT)
            except TransientFHIRError as exc:  # from the SMART token endpoint
                error = exc
                retryable = True
            else:
                if response.is_success:
                    return response
                error = _status_error(method, url, response, self._retry)
                retryable = isinstance(error, TransientFHIRError) and (
                    idempotent or response.status_code in _NOT_PROCESSED
                )
            if not retryable or attempt >= self._retry.max_attempts:
                raise error
            retry_after = error.retry_after if isinstance(error, TransientFHIRError) else None
            delay = self._retry.delay(attempt, retry_after)
            log.warning("%s; retry %d in %.1f s", error, attempt, delay)
            if self._on_retry is not None:
                self._on_retry(error)
            await self._sleep(delay)


    async def _send(
        self,
        request: httpx.Request,
        authenticate: bool,
        consume: Callable[[httpx.Response], Awaitable[None]] | None,
    ) -> httpx.Response:
        # `auth=None` on a request turns the client's auth off for it (httpx's own convention).
        auth = httpx.USE_CLIENT_DEFAULT if authenticate else None
        response = await self._http.send(request, auth=auth, stream=True)
        try:
            if consume is not None and response.is_success:
                await consume(response)
            else:
                await response.aread()
        finally:
            await response.aclose()
        return response


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _checked_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise InvalidResource(f"not a FHIR id: {value!r}")
    return value


def _resource_type(resource: Mapping[str, Any]) -> str:
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise InvalidResource("resource has no resourceType")
    return resource_type


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = jsonio.loads(response.content)
    except jsonio.JSONDecodeError:
        raise FatalFHIRError(
            f"{response.request.method} {response.request.url}: answer is not JSON",
            status=response.status_code,
        ) from None
    if not isinstance(body, dict):
        raise FatalFHIRError(
            f"{response.request.method} {response.request.url}: answer is not a JSON object",
            status=response.status_code,
        )
    return body


def _resource_response(response: httpx.Response) -> FHIRResponse:
    return FHIRResponse(
        status=response.status_code,
        # `Prefer: return=representation` is a request; a server may still answer empty.
        resource=_json(response) if response.content else None,
        etag=response.headers.get("ETag"),
        location=response.headers.get("Content-Location") or response.headers.get("Location"),
    )


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link", []):
        if link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None


def _status_error(
    method: str, url: str, response: httpx.Response, policy: RetryPolicy
) -> FHIRError:
    status = response.status_code
    message = f"{method} {url} answered {status}"
    if diagnostics := _outcome_text(response):
        message = f"{message}: {diagnostics}"
    if policy.is_retryable_status(status):
        return TransientFHIRError(
            message,
            status=status,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    if status in (401, 403):
        return AuthError(message, status=status)
    # HAPI answers an If-Match mismatch with 409 (HAPI-0989) where FHIR says 412.
    if status in (409, 412):
        return VersionConflict(message, status=status)
    return FatalFHIRError(message, status=status)


def _outcome_text(response: httpx.Response) -> str:
    """The human text of an OperationOutcome body, if the error came with one."""
    try:
        return outcome_text(orjson.loads(response.content))
    except orjson.JSONDecodeError:
        return ""


def outcome_text(outcome: Any) -> str:
    """The human text of an OperationOutcome (its issues' diagnostics, else details.text), or
    "" for anything else."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    texts = []
    for issue in outcome.get("issue", []):
        if not isinstance(issue, dict):
            continue
        details = issue.get("details")
        text = issue.get("diagnostics") or (details.get("text") if isinstance(details, dict) else None)
        if isinstance(text, str) and text:
            texts.append(text)
    return "; ".join(texts)
