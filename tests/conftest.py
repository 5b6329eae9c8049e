from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from adapter.ruleset import RuleSet, load_ruleset
from adapter.service import create_app
from adapter.settings import Settings

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
