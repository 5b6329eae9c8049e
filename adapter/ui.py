"""The review page: billers see the open review Tasks and answer them (`GET /review`).

Server-rendered HTML (Jinja2, autoescaped). It holds no state of its own: the list and each
item are read from the FHIR server (our review Tasks), and an answer is written there, on the
Task (completed, `output` answer approve or reject, the person as `owner`), where an EHR's
worklist would write it too; the adapter then decides the Claim again as for any answer
(adapter/review.py, the REVIEW rule). The job for that is queued at once as well, so the answer
does not wait for the Subscription.

Never open by default: without `G0129_UI_PASSWORD` or `G0129_UI_USER_HEADER` the page answers
404. With a password, a person signs in with their name and that secret and gets a signed
cookie (HMAC, expiring); behind a site's proxy, the header it sets names the person. Every
action carries a CSRF token bound to the person (HMAC), checked in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from .errors import FatalFHIRError, VersionConflict
from .fhir_client import FHIRClient
from .settings import Settings
from .vocabulary import RULE_SYSTEM, TASK_CODE_SYSTEM

__all__ = ["ReviewItem", "review_router"]

COOKIE = "g0129_review"
SESSION_SECONDS = 8 * 3600
_TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(("html",), default=True)
)


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """One open review Task as the page shows it."""

    task: str  # Task id
    version: str
    claim: str
    patient: str
    service_dates: tuple[str, ...]
    payers: tuple[str, ...]
    rules: tuple[str, ...]
    missing: tuple[str, ...]
    findings: tuple[str, ...]
    proposed: tuple[str, ...]
    description: str


def _inputs(task: dict[str, Any], code: str, key: str = "valueString") -> tuple[str, ...]:
    return tuple(
        str(i.get(key))
        for i in task.get("input") or ()
        if isinstance(i, dict) and any(c.get("system") == TASK_CODE_SYSTEM and c.get("code") == code for c in (i.get("type") or {}).get("coding") or ())
    )


def review_item(task: dict[str, Any]) -> ReviewItem:
    """What the page shows of a review Task."""
    reason = task.get("reasonCode") or {}
    return ReviewItem(
        task=str(task.get("id")),
        version=str((task.get("meta") or {}).get("versionId") or ""),
        claim=str((task.get("focus") or {}).get("reference") or ""),
        patient=str((task.get("for") or {}).get("reference") or (task.get("for") or {}).get("display") or ""),
        service_dates=_inputs(task, "service-date", "valueDate"),
        payers=_inputs(task, "payer"),
        rules=tuple(str(c.get("code")) for c in reason.get("coding") or () if c.get("system") == RULE_SYSTEM),
        missing=_inputs(task, "missing-data"),
        findings=_inputs(task, "finding"),
        proposed=_inputs(task, "proposed-line"),
        description=str(task.get("description") or ""),
    )


def _matches(item: ReviewItem, payer: str, rule: str, date_from: str, date_to: str) -> bool:
    if payer and not any(p.split(" ", 1)[0] == payer for p in item.payers):
        return False
    if rule and rule not in item.rules:
        return False
    first = min(item.service_dates, default="")
    return not ((date_from and first < date_from) or (date_to and first > date_to))


class _Guard:
    """Who is signed in, and the CSRF token of each action; stateless (HMAC under a key of this
    process: a restart signs everyone out)."""

    def __init__(self, password: str | None, user_header: str | None) -> None:
        self.password = password
        self.user_header = user_header
        self._key = secrets.token_bytes(32)

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def cookie(self, user: str, now: float) -> str:
        payload = base64.urlsafe_b64encode(f"{int(now) + SESSION_SECONDS}|{user}".encode()).decode()
        return f"{payload}.{self._sign(payload)}"

    def user(self, request: Request, now: float) -> str | None:
        if self.user_header:
            return request.headers.get(self.user_header) or None
        value = request.cookies.get(COOKIE) or ""
        payload, _, signature = value.rpartition(".")
        if not payload or not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            expires, _, user = base64.urlsafe_b64decode(payload.encode()).decode().partition("|")
            return user if int(expires) > now and user else None
        except ValueError:
            return None

    def csrf(self, subject: str) -> str:
        return self._sign(f"csrf|{subject}")

    def csrf_ok(self, subject: str, token: str) -> bool:
        return hmac.compare_digest(self.csrf(subject), token)

    def password_ok(self, given: str) -> bool:
        return self.password is not None and hmac.compare_digest(given.encode(), self.password.encode())


def _html(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_TEMPLATES.get_template(template).render(**context), status_code=status)


async def _form(request: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body, each field's first value."""
    fields = parse_qs((await request.body()).decode("utf-8", errors="replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def review_router(
    settings: Settings,
    client: FHIRClient,
    on_answer: Callable[[str, str], Awaitable[None]],
    clock: Callable[[], float] = time.time,
) -> APIRouter:
    """The page's routes. `on_answer(task_id, version)` is told of each answer written (the
    service queues the decision it calls for)."""
    router = APIRouter(include_in_schema=False)  # a page for people, not part of the API
    guard = _Guard(settings.ui_password, settings.ui_user_header)
    off = guard.password is None and guard.user_header is None

    def refuse() -> Response | None:
        if off:
            return _html("message.html", 404, title="Not found", text="The review page is off: set G0129_UI_PASSWORD or G0129_UI_USER_HEADER.")
        return None

    def signed_in(request: Request) -> str | Response:
        closed = refuse()
        if closed is not None:
            return closed
        user = guard.user(request, clock())
        if user is None:
            if guard.user_header:
                return _html("message.html", 401, title="Not signed in", text=f"The proxy did not name you ({guard.user_header}).")
            return RedirectResponse("/review/sign-in", status_code=303)
        return user

    @router.get("/review/sign-in")
    async def sign_in_page(request: Request) -> Response:
        closed = refuse()
        if closed is not None:
            return closed
        if guard.user_header:
            return RedirectResponse("/review", status_code=303)
        return _html("sign_in.html", csrf=guard.csrf("sign-in"), error="")

    @router.post("/review/sign-in")
    async def sign_in(request: Request) -> Response:
        closed = refuse()
        if closed is not None:
            return closed
        form = await _form(request)
        name = form.get("name", "").strip()
        if not guard.csrf_ok("sign-in", form.get("csrf", "")) or guard.user_header:
            return _html("message.html", 403, title="Refused", text="This form is not ours (CSRF token).")
        if not name or not guard.password_ok(form.get("password", "")):
            return _html("sign_in.html", 401, csrf=guard.csrf("sign-in"), error="Wrong password, or no name.")
        response = RedirectResponse("/review", status_code=303)
        response.set_cookie(
            COOKIE, guard.cookie(name, clock()), max_age=SESSION_SECONDS, httponly=True, samesite="strict",
            secure=request.url.scheme == "https", path="/review",
        )
        return response

    @router.get("/review")
    async def review_list(request: Request, payer: str = "", rule: str = "", date_from: str = "", date_to: str = "") -> Response:
        user = signed_in(request)
        if isinstance(user, Response):
            return user
        tasks = await client.search(
            "Task", [("code", f"{TASK_CODE_SYSTEM}|review"), ("status", "requested"), ("_sort", "-_lastUpdated"), ("_count", "200")]
        )
        items = [review_item(t) for t in tasks]
        shown = sorted(
            (i for i in items if _matches(i, payer, rule, date_from, date_to)), key=lambda i: (min(i.service_dates, default=""), i.claim)
        )
        return _html(
            "review_list.html",
            user=user,
            items=shown,
            total=len(items),
            payers=sorted({p.split(" ", 1)[0] for i in items for p in i.payers}),
            rules=sorted({r for i in items for r in i.rules}),
            filters={"payer": payer, "rule": rule, "date_from": date_from, "date_to": date_to},
            query=urlencode({k: v for k, v in {"payer": payer, "rule": rule, "date_from": date_from, "date_to": date_to}.items() if v}),
        )

    @router.get("/review/{task_id}")
    async def review_detail(request: Request, task_id: str) -> Response:
        user = signed_in(request)
        if isinstance(user, Response):
            return user
        try:
            task = (await client.read("Task", task_id)).resource or {}
        except (FatalFHIRError, ValueError):
            return _html("message.html", 404, title="Not found", text="No such review item.")
        return _html("review_detail.html", user=user, item=review_item(task), task_status=task.get("status"), csrf=guard.csrf(user))

    @router.post("/review/{task_id}")
    async def review_answer(request: Request, task_id: str) -> Response:
        user = signed_in(request)
        if isinstance(user, Response):
            return user
        form = await _form(request)
        if not guard.csrf_ok(user, form.get("csrf", "")):
            return _html("message.html", 403, title="Refused", text="This form is not ours (CSRF token): open the item again.")
        answer = form.get("answer")
        if answer not in ("approve", "reject"):
            return _html("message.html", 400, title="Refused", text="Answer approve or reject.")
        try:
            task = (await client.read("Task", task_id)).resource or {}
        except (FatalFHIRError, ValueError):
            return _html("message.html", 404, title="Not found", text="No such review item.")
        if task.get("status") != "requested" or str((task.get("meta") or {}).get("versionId")) != form.get("version"):
            return _html("message.html", 409, title="Changed", text="Someone changed this item meanwhile: open it again.")
        now = datetime.fromtimestamp(clock(), timezone.utc).isoformat(timespec="seconds")
        coded = {"system": TASK_CODE_SYSTEM}
        done = {k: v for k, v in task.items() if k != "meta"} | {
            "meta": {k: v for k, v in (task.get("meta") or {}).items() if k not in ("versionId", "lastUpdated", "source")},
            "status": "completed",
            "owner": {"display": user},
            "executionPeriod": {"end": now},
            "lastModified": now,
            "output": [
                {
                    "type": {"coding": [coded | {"code": "answer"}]},
                    "valueCodeableConcept": {"coding": [coded | {"code": answer}]},
                }
            ],
        }
        try:
            written = await client.update(done, if_match=str(task["meta"]["versionId"]))
        except VersionConflict:
            return _html("message.html", 409, title="Changed", text="Someone changed this item meanwhile: open it again.")
        await on_answer(task_id, str(((written.resource or {}).get("meta") or {}).get("versionId") or ""))
        return RedirectResponse("/review", status_code=303)

    return router
