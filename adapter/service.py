"""The sidecar: FastAPI endpoints that accept FHIR Subscription notifications.

A notification is stored durably in the queue before the 2xx goes out, and the reply is fast
(the worker does the work). HAPI parses the reply of a topic-based delivery as FHIR, so every
reply is a FHIR resource: an OperationOutcome, or an empty batch-response Bundle for a
notification Bundle. Bad input is a 400 with an OperationOutcome, never a 5xx
(adapter/notifications.py checks it); a notification Bundle with more events than
G0129_MAX_EVENTS becomes one catch-up job.

    PUT  /notify/{type}/{id}   R4 rest-hook with the full resource
    POST /notify               R4 rest-hook without payload, or a notification Bundle
    POST /$evaluate            a Bundle in; a collection Bundle out: the annotated Claims, a
                               Parameters of the decisions, an OperationOutcome per unusable input
    GET  /healthz /readyz /metrics, /docs and /openapi.json (adapter/openapi.py)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from . import jsonio, openapi
from .errors import FHIRError, InputError, InvalidElement, InvalidJSON, NotFHIR, UsageError
from .fhir_client import FHIRClient
from .ingest import Index, load_value
from .metrics import CONTENT_TYPE, Metrics
from .notifications import (
    PATH,
    SOURCE,
    Change,
    check_id,
    check_resource_type,
    parse_bundle_notification,
    parse_json,
    parse_resource_delivery,
)
from .openapi import FHIR_JSON
from .pipeline import RunResult, evaluate
from .queue import GroupCommit, JobQueue, NewJob
from .retry import RetryPolicy
from .ruleset import RuleSet, load_ruleset
from .settings import Settings
from .ui import review_router
from .worker import CATCH_UP, RESOURCE, WATCHED, Worker

__all__ = ["FHIR_JSON", "FHIRResponse", "create_app", "evaluation_bundle", "operation_outcome"]

log = logging.getLogger(__name__)


class FHIRResponse(Response):
    """A FHIR resource, as `application/fhir+json` (also what the OpenAPI document says)."""

    media_type = FHIR_JSON


def operation_outcome(severity: str, code: str, text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


def _fhir(body: dict[str, Any], status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return FHIRResponse(jsonio.dumps(body), status_code=status, headers=headers)


def _issue(error: InputError) -> dict[str, Any]:
    """One OperationOutcome issue for an input that could not be used."""
    if isinstance(error, InvalidElement):
        return {"severity": "error", "code": "value", "diagnostics": str(error), "expression": [error.element]}
    code = "structure" if isinstance(error, (InvalidJSON, NotFHIR)) else "invalid"
    return {"severity": "error", "code": code, "diagnostics": str(error)}


def evaluation_bundle(result: RunResult, errors: Sequence[InputError]) -> dict[str, Any]:
    """The answer of `POST /$evaluate`: a collection Bundle of the annotated Claims, one
    Parameters with a `decision` parameter per decision (`valueString`: the decision JSON, as
    `g0129 evaluate` prints it), and an OperationOutcome per input that could not be used."""
    decisions = [
        {"name": "decision", "valueString": jsonio.dumps(decision.to_json()).decode()} for decision in result.decisions
    ]
    entries: list[dict[str, Any]] = [{"resource": claim.resource} for claim in result.claims]
    # Parameters.parameter is 1..*: with no decision the Parameters is left out.
    if decisions:
        entries.append({"resource": {"resourceType": "Parameters", "parameter": decisions}})
    entries.extend({"resource": {"resourceType": "OperationOutcome", "issue": [_issue(e)]}} for e in errors)
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


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

    def count_retry(error: FHIRError) -> None:
        metrics.retries.labels("http").inc()
        log.warning("FHIR request retried: %s", error, extra={"event": "retry", "kind": "http", "error": str(error)})

    client = FHIRClient.from_settings(settings, transport=transport, on_retry=count_retry)
    # Readiness must answer fast: one try, a short timeout.
    probe = FHIRClient.from_settings(settings, transport=transport, retry=RetryPolicy(max_attempts=1), timeout=3.0)
    worker = Worker(
        queue, client, rules, metrics, dry_run=dry_run, review_owner=settings.review_owner,
        catch_up_interval=settings.catchup_interval, concurrency=settings.worker_concurrency, clock=clock,
    )
    intake = GroupCommit(queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Jobs a killed predecessor had leased are due now, not when their lease runs out.
        reclaimed = await asyncio.to_thread(queue.reclaim_abandoned)
        if reclaimed:
            log.warning("%d job(s) left leased by a stopped process are due again", reclaimed, extra={"event": "reclaimed", "jobs": reclaimed})
        # The type check imports the model of each type it meets once: do the usual ones now.
        await asyncio.to_thread(_warm_type_checks)
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

    app = FastAPI(
        title="G0129 billing adapter",
        summary="Decides how OT in PHP/IOP is billed under HCPCS G0129 from FHIR R4 Subscription notifications.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.queue, app.state.worker, app.state.metrics = queue, worker, metrics

    async def answered(task_id: str, version: str) -> None:
        # The Subscription will tell us too; deciding now does not wait for it.
        if await asyncio.to_thread(queue.enqueue, RESOURCE, "Task", task_id, version, None, "review-page"):
            worker.wake.set()

    app.include_router(review_router(settings, client, answered, clock))

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.complete(
                get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]  # FastAPI's documented way to extend it

    @app.exception_handler(_Rejected)
    async def rejected(request: Request, exc: _Rejected) -> Response:
        return _fhir(operation_outcome("error", exc.code, exc.text), exc.status, exc.headers)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, exc: InputError) -> Response:
        code = "structure" if isinstance(exc, (InvalidJSON, NotFHIR)) else "invalid"
        return _fhir(operation_outcome("error", code, str(exc)), 400)

    @app.exception_handler(RequestValidationError)
    async def unusable_request(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI would answer 422 with its own JSON; every answer here is FHIR.
        return _fhir(operation_outcome("error", "invalid", "the request cannot be used"), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # 404, 405: FHIR too, for a FHIR server reading our answers.
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        return _fhir(operation_outcome("error", code, str(exc.detail)), exc.status_code, exc.headers)

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

    async def accept(changes: Sequence[Change], source: str) -> int:
        """Store the changes as jobs, in one transaction (durable when this returns); returns
        how many were new."""
        jobs = [
            NewJob(
                RESOURCE,
                change.resource_type,
                change.resource_id,
                change.version_id,
                jsonio.dumps(change.resource) if change.resource is not None else None,
                source,
                change.last_updated,
            )
            for change in changes
        ]
        new = sum(await intake.enqueue(jobs))
        if new:
            worker.wake.set()
        if len(jobs) > new:
            metrics.deduplicated.inc(len(jobs) - new)
        return new

    async def catch_up_later(reason: str) -> None:
        # At most one catch-up is pending: while one is, this request is a duplicate of it.
        await intake.enqueue([NewJob(CATCH_UP, "Subscription", CATCH_UP, source=reason)])
        worker.wake.set()

    notify_errors = openapi.error_responses(400, 401, 413)

    @app.put(
        "/notify/{resource_type}/{resource_id}",
        summary="R4 rest-hook delivery with the full resource",
        response_class=FHIRResponse,
        responses={200: openapi.fhir_response("Stored durably (or already stored) before this answer.", "OperationOutcome"), **notify_errors},
        openapi_extra={
            "requestBody": openapi.request_body(
                "The changed resource; its type and id are those of the path. HAPI's `If-Match` gives its version when meta was stripped.",
                "Resource",
                {"claim": openapi.CLAIM_EXAMPLE},
            ),
            "security": [{"bearer": []}],
        },
    )
    async def notify_resource(
        resource_type: Annotated[
            str, Path(description="An R4 resource type, case-sensitive.", json_schema_extra={"pattern": openapi.TYPE_PATTERN})
        ],
        resource_id: Annotated[
            str, Path(description="A FHIR id.", json_schema_extra={"pattern": openapi.ID_PATTERN})
        ],
        request: Request,
    ) -> Response:
        check_token(request)
        # The path first: a bad one is refused before its body is read.
        check_resource_type(resource_type, PATH)
        check_id(resource_id, PATH)
        body = await read_body(request)
        metrics.notifications.labels("rest-hook-resource").inc()
        change = await asyncio.to_thread(
            parse_resource_delivery, body, resource_type, resource_id, request.headers.get("if-match")
        )
        new = await accept([change], "rest-hook")
        text = "accepted" if new else "already accepted"
        return _fhir(operation_outcome("information", "informational", f"{text}: {resource_type}/{resource_id}"))

    @app.post(
        "/notify",
        summary="R4 rest-hook without payload, or a topic-based notification Bundle",
        response_class=FHIRResponse,
        responses={
            200: openapi.fhir_response(
                "Stored durably before this answer: an OperationOutcome for a bodyless rest-hook, an empty batch-response Bundle for a notification Bundle.",
                "OperationOutcome",
                "Bundle",
            ),
            **notify_errors,
        },
        openapi_extra={
            "requestBody": openapi.request_body(
                "Nothing (R4 rest-hook without payload: a catch-up search follows), or a notification Bundle: R4 backport "
                "(`history`, first entry a `Parameters`) or R4B/R5 (first entry a `SubscriptionStatus`).",
                "Bundle",
                openapi.NOTIFY_EXAMPLES,
                required=False,
            ),
            "security": [{"bearer": []}],
        },
    )
    async def notify(request: Request) -> Response:
        check_token(request)
        body = await read_body(request)
        if not body.strip():
            metrics.notifications.labels("rest-hook-empty").inc()
            await catch_up_later("rest-hook without payload")
            return _fhir(operation_outcome("information", "informational", "accepted: catch-up queued"))
        note = await asyncio.to_thread(parse_bundle_notification, body)
        metrics.notifications.labels(note.kind).inc()
        if note.kind == "handshake" and note.subscription:
            # A Subscription (re)starting counts its events from 1 again: after a server reset
            # the numbers we kept would hide every gap.
            await asyncio.to_thread(queue.forget_event_number, note.subscription)
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
        if len(note.changes) > settings.max_events:
            # One job per event would hold the request past the sender's patience: one search
            # finds them all.
            await catch_up_later(
                f"{note.subscription}: {len(note.changes)} events in one notification (G0129_MAX_EVENTS={settings.max_events})"
            )
        else:
            await accept(note.changes, f"{note.kind} {note.subscription or ''}".strip())
        if note.needs_catch_up:
            await catch_up_later(f"{note.subscription}: an event without a focus we can look up")
        return _fhir({"resourceType": "Bundle", "type": "batch-response", "entry": []})

    @app.post(
        "/$evaluate",
        summary="Decide a Bundle, write nothing",
        response_class=FHIRResponse,
        responses={
            200: {
                **openapi.fhir_response(
                    "A `collection` Bundle: the annotated Claims; one `Parameters` with a `decision` parameter per decision "
                    "(`valueString`: the decision JSON, as `g0129 evaluate` prints it); one `OperationOutcome` per input "
                    "that could not be used (an invalid resource, an invalid element the rules read).",
                    "Bundle",
                ),
                "content": {FHIR_JSON: {"schema": {"$ref": "#/components/schemas/Bundle"}, "example": openapi.EVALUATE_RESULT_EXAMPLE}},
            },
            **openapi.error_responses(400, 401, 413),
        },
        openapi_extra={
            "requestBody": openapi.request_body(
                "A Bundle of any type (or one resource) holding the encounters, sessions, Claims and what they reference.",
                "Bundle",
                openapi.EVALUATE_EXAMPLES,
            ),
            "security": [{"bearer": []}],
        },
    )
    async def evaluate_bundle(request: Request) -> Response:
        check_token(request)
        body = await read_body(request)
        value = await asyncio.to_thread(parse_json, body)
        entries, errors = load_value(value, SOURCE)
        # A body that is no usable resource is a 400; a Bundle entry that is not gets an
        # OperationOutcome in the answer, beside what could be decided.
        if errors and not entries and not (isinstance(value, dict) and value.get("resourceType") == "Bundle"):
            raise errors[0]
        index = Index()
        for entry in entries:
            index.add(entry)
        result = await asyncio.to_thread(evaluate, index, rules, "none")
        return _fhir(await asyncio.to_thread(evaluation_bundle, result, [*errors, *result.errors]))

    @app.get("/healthz", summary="The process is alive", responses={200: {"description": "Alive."}})
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/readyz",
        summary="The state store and the FHIR server answer",
        responses={
            200: {"description": "Ready.", "content": {"application/json": {"example": {"status": "ready"}}}},
            503: {
                "description": "Not ready, with the problems.",
                "content": {"application/json": {"example": {"status": "not ready", "problems": ["FHIR server: ..."]}}},
            },
        },
    )
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

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def app_from_env() -> FastAPI:
    """The service as each process of `g0129 serve --workers N` builds it: settings, rule
    tables and logging from the environment (uvicorn starts the processes afresh)."""
    from .logs import configure

    settings = Settings.from_env()
    configure(settings.log_format, settings.log_level)
    return create_app(settings, rules=load_ruleset(settings.mappings_dir))


def _warm_type_checks() -> None:
    for resource_type in WATCHED:
        check_resource_type(resource_type)
