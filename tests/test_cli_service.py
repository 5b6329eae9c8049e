"""The sidecar commands as a user runs them: serve (in a real process), subscribe, queue, and
replay --fhir-base."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from adapter.cli import main

from .conftest import FIXTURES, ROOT
from .fakefhir import FakeFHIR

TOKEN = "cli-webhook-token"
BASE = "http://fhir.test/fhir"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "G0129_FHIR_BASE_URL": BASE,
        "G0129_WEBHOOK_TOKEN": TOKEN,
        "G0129_DATA_DIR": str(tmp_path / "data"),
        "G0129_RETRY_MAX_ATTEMPTS": "1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


class Server:
    """`g0129 serve` in its own process, stopped the hard way when asked."""

    def __init__(self, env: dict[str, str], port: int, log: Path, *options: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "adapter.cli", "serve", "--port", str(port), "--log-level", "warning", *options],
                env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.proc.kill()
        self.proc.wait(10)
        raise AssertionError(f"service did not start: {log.read_text()}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM: with --workers, uvicorn's parent stops its processes before it exits."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def pending_metric(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("g0129_queue_pending "):
            return float(line.split()[1])
    raise AssertionError("no g0129_queue_pending")


def test_unreachable_fhir_server_accepts_survives_kill_9_and_deduplicates(tmp_path: Path, env: dict[str, str]) -> None:
    closed = free_port()  # nothing listens there: the FHIR server is down
    env = {**env, "G0129_FHIR_BASE_URL": f"http://127.0.0.1:{closed}/fhir", "G0129_CATCHUP_INTERVAL": "3600"}
    port = free_port()
    claim = {
        "resourceType": "Claim", "id": "c1", "meta": {"versionId": "3"}, "status": "active", "use": "claim",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "institutional"}]},
        "item": [{"sequence": 1, "encounter": [{"reference": "Encounter/e1"}]}],
    }
    headers = {"Authorization": f"Bearer {TOKEN}"}

    server = Server(env, port, tmp_path / "serve.log")
    r = httpx.put(f"{server.url}/notify/Claim/c1", content=orjson.dumps(claim), headers=headers)
    assert r.status_code == 200
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 503
    before = pending_metric(server.url)
    assert before >= 1
    server.kill9()

    server = Server(env, port, tmp_path / "serve.log")
    try:
        assert httpx.put(f"{server.url}/notify/Claim/c1", content=orjson.dumps(claim), headers=headers).status_code == 200
        assert pending_metric(server.url) == before, "the redelivery is not counted twice"
        assert httpx.get(f"{server.url}/readyz").status_code == 503
    finally:
        server.kill9()
    code, out, _ = run("queue", "list")
    listed = [orjson.loads(line) for line in out.splitlines()]
    assert [j["resource"] for j in listed if j["kind"] == "resource"] == ["Claim/c1/_history/3"]
    assert all(j["state"] == "pending" for j in listed)


def test_queue_retry_and_purge(env: dict[str, str]) -> None:
    from adapter.queue import JobQueue
    from adapter.settings import Settings

    with JobQueue.from_settings(Settings.from_env()) as queue:
        queue.enqueue("resource", "Claim", "c1", "1", None, "test")
        job = queue.claim_next(time.time())
        assert job is not None
        queue.dead_letter(job.id, "HTTP 400: Claim.status is required")
    code, out, _ = run("queue", "list", "--state", "dead")
    assert code == 0 and "Claim.status is required" in out
    assert run("queue", "retry")[0] == 2
    assert run("queue", "retry", "--all")[1].startswith("1 job(s)")
    code, out, err = run("queue", "list")
    assert "Claim/c1" in out and "pending 1" in err
    assert run("queue", "purge", "--state", "done") == (0, "0 done job(s) purged\n", "")


def test_subscribe_is_idempotent(env: dict[str, str], fake: FakeFHIR) -> None:
    code, out, err = run("subscribe", "--endpoint", "http://adapter:8000/notify", "--wait", "0")
    assert code == 0, err
    assert out.count(": created") == 4
    subs = {s["id"]: s for s in fake.all("Subscription")}
    assert set(subs) == {"g0129-encounter", "g0129-procedure", "g0129-claim", "g0129-task"}
    # A person's answer notifies us; the Tasks we write (requested, cancelled) do not.
    assert subs["g0129-task"]["criteria"] == "Task?code=https://g0129-adapter.org/fhir/CodeSystem/task-codes|review&status=completed"
    claim = subs["g0129-claim"]
    assert claim["criteria"] == "Claim?_tag:not=https://g0129-adapter.org/fhir/CodeSystem/tags|annotated"
    assert claim["channel"] == {
        "type": "rest-hook", "endpoint": "http://adapter:8000/notify",
        "header": [f"Authorization: Bearer {TOKEN}"], "payload": "application/fhir+json",
    }
    code, out, _ = run("subscribe", "--endpoint", "http://adapter:8000/notify", "--wait", "0")
    assert out.count(": unchanged") == 4 and len(fake.all("Subscription")) == 4
    assert all(len(h) == 1 for (t, _), h in fake.store.items() if t == "Subscription")
    code, out, _ = run("subscribe", "--endpoint", "http://adapter2:8000/notify", "--wait", "0")
    assert out.count(": updated") == 4


def test_subscribe_reports_subscriptions_that_stay_requested(env: dict[str, str], fake: FakeFHIR) -> None:
    code, _, err = run("subscribe", "--endpoint", "http://adapter:8000/notify", "--wait", "0.5")
    assert code == 1 and "not every Subscription became active" in err


def _load_fixture(fake: FakeFHIR, name: str) -> dict[str, Any]:
    bundle = orjson.loads((FIXTURES / name).read_bytes())
    fake.load(*(e["resource"] for e in bundle["entry"]))
    return bundle


def test_replay_to_a_fhir_server_dry_run_then_for_real(tmp_path: Path, env: dict[str, str], fake: FakeFHIR) -> None:
    _load_fixture(fake, "01-medicare-php-hospital.json")
    fixture = str(FIXTURES / "01-medicare-php-hospital.json")
    code, out, err = run("replay", fixture, "--out", str(tmp_path / "o"), "--fhir-base", BASE, "--dry-run")
    assert code == 0, err
    added = [line for line in out.splitlines() if line.startswith("+")]
    assert any('"code": "G0129"' in line for line in added), "the diff shows the G0129 line being added"
    assert out.count("+++ Claim/php01-claim (annotated)") == 1
    assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "1", "dry run writes nothing"

    code, out, err = run("replay", fixture, "--out", str(tmp_path / "o"), "--fhir-base", BASE)
    assert code == 0, err
    assert "Claim/php01-claim: updated (version 2)" in out
    code, out, _ = run("replay", fixture, "--out", str(tmp_path / "o"), "--fhir-base", BASE)
    assert "Claim/php01-claim: unchanged" in out
    assert fake.current("Claim", "php01-claim")["meta"]["versionId"] == "2"


def test_replay_creates_a_draft_once(tmp_path: Path, env: dict[str, str], fake: FakeFHIR) -> None:
    fixture = str(FIXTURES / "41-no-claim-draft.json")
    for _ in range(2):
        code, out, err = run("replay", fixture, "--out", str(tmp_path / "o"), "--fhir-base", BASE)
        assert code == 0, err
    drafts = fake.all("Claim")
    assert len(drafts) == 1 and drafts[0]["status"] == "draft"


def test_dry_run_without_server_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = run("replay", str(FIXTURES / "01-medicare-php-hospital.json"), "--out", str(tmp_path), "--dry-run")
    assert code == 2 and "--dry-run needs --fhir-base" in err


def test_unreachable_server_on_replay_is_one_line_per_claim(tmp_path: Path, env: dict[str, str]) -> None:
    base = f"http://127.0.0.1:{free_port()}/fhir"
    code, _, err = run("replay", str(FIXTURES / "01-medicare-php-hospital.json"), "--out", str(tmp_path), "--fhir-base", base)
    assert code == 1
    assert err.startswith("error: Claim/php01-claim: not written:") and "Traceback" not in err


def test_serve_with_two_processes_on_one_queue(database_url: str, env: dict[str, str], tmp_path: Path) -> None:
    # The FHIR server is down; the Claims name no encounter, so their jobs end without it.
    env = env | {"G0129_DATABASE_URL": database_url, "G0129_FHIR_BASE_URL": f"http://127.0.0.1:{free_port()}/fhir"}
    server = Server(env, free_port(), tmp_path / "serve.log", "--workers", "2", "--log-level", "info")
    try:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
        with httpx.Client(base_url=server.url, headers=headers) as client:
            for n in range(20):
                claim = {"resourceType": "Claim", "id": f"c{n}", "meta": {"versionId": "1", "lastUpdated": "2026-07-24T12:00:00Z"}}
                assert client.put(f"/notify/Claim/c{n}", content=orjson.dumps(claim)).status_code == 200
    finally:
        server.stop()
    from adapter.queue import JobQueue

    with JobQueue(database_url) as queue:
        stored = {job.resource_id for state in ("pending", "done") for job in queue.list(state) if job.kind == "resource"}
    assert stored == {f"c{n}" for n in range(20)}
    assert server.log.read_text().count("Started server process") == 2


def test_serve_refuses_a_dry_run_in_several_processes(env: dict[str, str]) -> None:
    code, _, err = run("serve", "--workers", "2", "--dry-run")
    assert code == 2 and "--dry-run runs in one process" in err
