from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import respx

from adapter.ruleset import RuleSet, load_ruleset
from adapter.service import create_app
from adapter.settings import Settings
from adapter.vocabulary import TAG_SYSTEM

from .fakefhir import FakeFHIR

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
# Scenarios of deliberately invalid input, apart so that `g0129 replay fixtures/` (the quick start)
# runs clean; the scenario tests read both folders.
INVALID_FIXTURES = ROOT / "fixtures-invalid"
SCENARIO_DIRS = (FIXTURES, INVALID_FIXTURES)


@pytest.fixture(scope="session")
def ruleset() -> RuleSet:
    return load_ruleset()


# -- the job queue's databases ---------------------------------------------------------------

# A PostgreSQL for the tests (`scripts/postgres up` prints its URL); `.ci/run` sets it, and with
# G0129_E2E_REQUIRED=1 its absence fails the PostgreSQL tests instead of skipping them.
TEST_DATABASE_URL = os.environ.get("G0129_TEST_DATABASE_URL", "")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The test PostgreSQL as a URL whose tables land in a fresh schema of their own, dropped
    afterwards: tests see an empty database, and leave nothing behind."""
    if not TEST_DATABASE_URL:
        if os.environ.get("G0129_E2E_REQUIRED") == "1":
            pytest.fail("G0129_TEST_DATABASE_URL is not set, and G0129_E2E_REQUIRED=1 (scripts/postgres up prints it)")
        pytest.skip("no PostgreSQL: G0129_TEST_DATABASE_URL is not set (scripts/postgres up prints it)")
    import psycopg

    schema = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in TEST_DATABASE_URL else "?"
    try:
        yield f"{TEST_DATABASE_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as db:
            db.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend of the job queue in turn, empty: an SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'queue.sqlite3'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


# -- the sidecar through its ASGI seam (httpx.ASGITransport), no server, no socket -----------

BASE = "http://fhir.test/fhir"
TOKEN = "s3cret-webhook-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings(tmp_path: Path, **extra: str) -> Settings:
    env = {"G0129_FHIR_BASE_URL": BASE, "G0129_WEBHOOK_TOKEN": TOKEN, "G0129_DATA_DIR": str(tmp_path / "data")}
    env.update(extra)
    return Settings.from_env(env)


@pytest.fixture
def fake() -> Iterator[FakeFHIR]:
    """The in-memory FHIR server at BASE, every request to it routed there (respx)."""
    server = FakeFHIR(BASE)
    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="fhir.test").mock(side_effect=server)
        yield server


@asynccontextmanager
async def service(tmp_path: Path, **extra: str) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = create_app(settings(tmp_path, **extra), run_worker=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://adapter") as client:
            yield client, app


def serve(tmp_path: Path, test: Callable[[httpx.AsyncClient, Any], Awaitable[None]], **extra: str) -> None:
    async def main() -> None:
        async with service(tmp_path, **extra) as (client, app):
            await test(client, app)

    asyncio.run(main())


# -- a real FHIR server (the end-to-end and image tests) -------------------------------------


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def php_day_transaction(
    base: str, change: Callable[[dict[str, dict[str, Any]]], None] | None = None
) -> tuple[str, dict[str, Any]]:
    """Fixture 01 (a Medicare PHP day) under fresh ids, as a transaction Bundle of PUTs for the
    server at `base`; returns (prefix, bundle). The Claim is `Claim/{prefix}-claim`."""
    prefix = f"e{uuid.uuid4().hex[:10]}"
    raw = (FIXTURES / "01-medicare-php-hospital.json").read_bytes().replace(b"php01-", f"{prefix}-".encode())
    bundle = orjson.loads(raw)
    resources = {e["resource"]["id"].removeprefix(f"{prefix}-"): e["resource"] for e in bundle["entry"]}
    if change:
        change(resources)
    entries = [
        {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources.values()
    ]
    return prefix, {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def annotated(c: dict[str, Any]) -> bool:
    """The Claim carries our `annotated` tag: the adapter wrote its decision onto it."""
    return any(t.get("system") == TAG_SYSTEM and t.get("code") == "annotated" for t in (c.get("meta") or {}).get("tag", []))
