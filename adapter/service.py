"""The sidecar: FastAPI endpoints that accept FHIR Subscription notifications.

A notification is stored durably in the queue before the 2xx goes out, and the reply is fast
(the worker does the work). HAPI parses the reply of a topic-based delivery as FHIR, so every
reply is a FHIR resource: an OperationOutcome, or an empty batch-response Bundle for a
notification Bundle.

    PUT  /notify/{type}/{id}   R4 rest-hook with the full resource
    POST /notify               R4 rest-hook without payload, or a notification Bundle
    POST /$evaluate            a Bundle in, decisions and annotated Claims out, nothing written
    GET  /healthz /readyz /metrics
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .errors import FHIRError, InputError, UsageError
from .fhir_client import FHIRClient
from .ingest import Index, load_value
from .metrics import CONTENT_TYPE, Metrics
from .notifications import Change, parse_bundle_notification, parse_resource_delivery
from .pipeline import evaluate
from .queue import JobQueue
from .retry import RetryPolicy
from .ruleset import RuleSet, load_ruleset
from .settings import Settings
from .worker import CATCH_UP, RESOURCE, Worker

__all__ = ["FHIR_JSON", "create_app", "operation_outcome"]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


def operation_outcome(severity: str, code: str, text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


def _fhir(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


class _Rejected(Exception):
    def __init__(self, status: int, code: str, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.code, self.text, self.headers = status, code, text, headers


def create_app(
    settings: Settings,
    *,
    rules: RuleSet | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    run_worker: bool = True,
    dry_run: bool = False,
    clock: Callable[[], float] | None = None,
) -> FastAPI:
    """The service. `transport` is the test seam for the FHIR server; `run_worker=False` only
    accepts notifications (tests drive the worker themselves)."""
    if not settings.webhook_token:
        raise UsageError("G0129_WEBHOOK_TOKEN must be set: the webhook accepts no unauthenticated notification")
    if not settings.fhir_base_url:
        raise UsageError("G0129_FHIR_BASE_URL must be set for the service")
    rules = rules or load_ruleset(settings.mappings_dir)
    expected = f"Bearer {settings.webhook_token}".encode()
    clock = clock or time.time
    queue = JobQueue.from_settings(settings, clock)
    metrics = Metrics(queue.counts, rules.version)

    def count_retry(_: FHIRError) -> None:
        metrics.retries.labels("http").inc()

    client = FHIRClient.from_settings(settings, transport=transport, on_retry=count_retry)
    # Readiness must answer fast: one try, a short timeout.
    probe = FHIRClient.from_settings(settings, transport=transport, retry=RetryPolicy(max_attempts=1), timeout=3.0)
    worker = Worker(queue, client, rules, metrics, dry_run=dry_run, catch_up_interval=settings.catchup_interval, clock=clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        if run_worker:
            tasks = [asyncio.create_task(worker.run(stop)), asyncio.create_task(worker.tick_catch_up(stop))]
        app.state.tasks = tasks
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()
            await probe.aclose()
            queue.close()

    app = FastAPI(title="G0129 billing adapter", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.queue, app.state.worker, app.state.metrics = queue, worker, metrics

    @app.exception_handler(_Rejected)
    async def rejected(request: Request, exc: _Rejected) -> Response:
        return _fhir(operation_outcome("error", exc.code, exc.text), exc.status, exc.headers)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, exc: InputError) -> Response:
        return _fhir(operation_outcome("error", "invalid", str(exc)), 400)

    def check_token(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise _Rejected(401, "login", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _Rejected(413, "too-costly", f"body over {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Rejected(413, "too-costly", f"body over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def accept(change: Change, source: str) -> bool:
        payload = orjson.dumps(change.resource) if change.resource is not None else None
        new = await asyncio.to_thread(
            queue.enqueue, RESOURCE, change.resource_type, change.resource_id, change.version_id, payload, source
        )
        if new:
            worker.wake.set()
        else:
            metrics.deduplicated.inc()
        return new

    async def catch_up_later(reason: str) -> None:
        # One id for every catch-up request: while one waits, the others are duplicates of it.
        await asyncio.to_thread(queue.enqueue, CATCH_UP, "Subscription", CATCH_UP, "", None, reason)
        worker.wake.set()

    @app.put("/notify/{resource_type}/{resource_id}")
    async def notify_resource(resource_type: str, resource_id: str, request: Request) -> Response:
        check_token(request)
        body = await read_body(request)
        metrics.notifications.labels("rest-hook-resource").inc()
        change = parse_resource_delivery(body, resource_type, resource_id, request.headers.get("if-match"))
        new = await accept(change, "rest-hook")
        text = "accepted" if new else "already accepted"
        return _fhir(operation_outcome("information", "informational", f"{text}: {resource_type}/{resource_id}"))

    @app.post("/notify")
    async def notify(request: Request) -> Response:
        check_token(request)
        body = await read_body(request)
        if not body.strip():
            metrics.notifications.labels("rest-hook-empty").inc()
            await catch_up_later("rest-hook without payload")
            return _fhir(operation_outcome("information", "informational", "accepted: catch-up queued"))
        note = parse_bundle_notification(body)
        metrics.notifications.labels(note.kind).inc()
        if note.subscription and note.events_since_start is not None:
            last = await asyncio.to_thread(queue.last_event_number, note.subscription)
            counted = note.kind in ("event-notification", "query-event")
            expected_next = (last or 0) + 1
            # Events the server generated that never reached us: recover by searching.
            if last is not None and (
                (counted and note.first_event is not None and note.first_event > expected_next)
                or (not counted and note.events_since_start > last)
            ):
                await catch_up_later(f"{note.subscription}: events {expected_next}..{note.events_since_start} missed")
            if counted:
                await asyncio.to_thread(queue.record_event_number, note.subscription, note.events_since_start)
        for change in note.changes:
            await accept(change, f"{note.kind} {note.subscription or ''}".strip())
        if note.needs_catch_up:
            await catch_up_later(f"{note.subscription}: empty event notification")
        return _fhir({"resourceType": "Bundle", "type": "batch-response", "entry": []})

    @app.post("/$evaluate")
    async def evaluate_bundle(request: Request) -> Response:
        body = await read_body(request)
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _Rejected(400, "structure", f"malformed JSON ({exc})") from None
        entries, errors = load_value(value, "request body")
        if errors:
            raise errors[0]
        index = Index()
        for entry in entries:
            index.add(entry)
        result = await asyncio.to_thread(evaluate, index, rules, False)
        return JSONResponse({"decisions": [d.to_json() for d in result.decisions], "claims": [c.resource for c in result.claims]})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Response:
        problems = []
        try:
            await asyncio.to_thread(queue.counts)
        except Exception as exc:  # any failure of the state store means not ready
            problems.append(f"state store: {exc}")
        for task in getattr(app.state, "tasks", []):
            if task.done():
                problems.append(f"worker stopped: {task.exception() if not task.cancelled() else 'cancelled'}")
        try:
            await probe.capabilities()
        except FHIRError as exc:
            problems.append(f"FHIR server: {exc}")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
