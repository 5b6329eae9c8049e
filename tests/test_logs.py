"""The service's logs: one JSON object (or text line) per record, fields included, and no query
string in uvicorn's access log (a real uvicorn server on 127.0.0.1)."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from adapter import logs
from adapter.service import create_app

from .conftest import AUTH, settings


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() changes process-wide logging: put it back for the other tests."""
    names = ("", "httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    logging.getLogger("uvicorn.access").removeFilter(logs._QUERY_FILTER)


def record(message: str, *args: Any, level: int = logging.INFO, **fields: Any) -> logging.LogRecord:
    rec = logging.LogRecord("adapter.worker", level, __file__, 1, message, args or None, None)
    rec.__dict__.update(fields)
    return rec


def test_json_is_one_object_per_line_with_time_level_logger_message_and_fields() -> None:
    rec = record("%s: updated", "Claim/c1", event="write-back", job=7, claim="Claim/c1", encounters=["Encounter/e1"], outcome="updated")
    line = logs.JsonFormatter().format(rec)
    assert "\n" not in line
    out = orjson.loads(line)
    assert list(out)[:4] == ["time", "level", "logger", "message"]
    assert out["time"].endswith("Z") and out["level"] == "info" and out["logger"] == "adapter.worker"
    assert out["message"] == "Claim/c1: updated"
    assert {k: out[k] for k in ("event", "job", "claim", "encounters", "outcome")} == {
        "event": "write-back", "job": 7, "claim": "Claim/c1", "encounters": ["Encounter/e1"], "outcome": "updated",
    }


def test_json_carries_the_traceback_and_survives_values_json_cannot_say() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("adapter.worker", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    rec.path = Path("/tmp/x")
    out = orjson.loads(logs.JsonFormatter().format(rec))
    assert "ValueError: boom" in out["exception"] and out["path"] == "/tmp/x"
    deep: Any = []
    for _ in range(400):  # deeper than orjson serialises
        deep = [deep]
    assert orjson.loads(logs.JsonFormatter().format(record("deep", value=deep)))["message"] == "deep"


def test_text_keeps_a_forged_line_on_one_line() -> None:
    rec = record("accepted: %s", "Encounter/a\r\nX-Injected: 1", resource="Encounter/a\nb", outcome="bill")
    line = logs.TextFormatter().format(rec)
    assert "\n" not in line and "\r" not in line
    assert "info adapter.worker: accepted: Encounter/a\\r\\nX-Injected: 1" in line
    assert line.endswith('resource="Encounter/a\\nb" outcome=bill')


def test_configure_replaces_its_own_handler(restore_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure("json", "info", first)
    logs.configure("text", "warning", second)
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_g0129_handler", False)]
    assert len(ours) == 1
    logging.getLogger("adapter.test").info("hidden")
    logging.getLogger("adapter.test").warning("shown")
    assert first.getvalue() == "" and second.getvalue().count("\n") == 1 and "shown" in second.getvalue()
    assert logging.getLogger("httpx").level == logging.WARNING, "httpx would log every FHIR search URL"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_access_log_never_shows_a_query_string(tmp_path: Path, restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure("json", "info", stream)
    app = create_app(settings(tmp_path), run_worker=False)
    port = _free_port()
    # As `g0129 serve` runs it: no logging config of uvicorn's own.
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz?token=s3cret-in-query").status_code == 200
        assert httpx.put(f"{base}/notify/Encounter/e1?token=s3cret-in-query&x=1", content=b"{}").status_code == 401
        assert httpx.get(f"{base}/metrics", params={"access_token": "s3cret-in-query"}, headers=AUTH).status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
    output = stream.getvalue()
    assert "s3cret-in-query" not in output and "token" not in output
    lines = [orjson.loads(line) for line in output.splitlines()]
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("GET", "/healthz", 200), ("PUT", "/notify/Encounter/e1", 401), ("GET", "/metrics", 200),
    ]
    assert access[0]["message"].endswith('"GET /healthz HTTP/1.1" 200')
    assert any(line["logger"] == "uvicorn.error" and "Uvicorn running" in line["message"] for line in lines)
    assert all("color_message" not in line for line in lines)


def test_serve_logs_json_lines_from_its_first_line(tmp_path: Path) -> None:
    """`g0129 serve` as an operator runs it: every line on stderr is a JSON object, the worker's
    retry (the FHIR server is down) included, and the access log has no query string."""
    import os
    import signal
    import subprocess
    import sys

    from .conftest import ROOT, TOKEN

    port, closed = _free_port(), _free_port()
    env = {
        **os.environ, "G0129_FHIR_BASE_URL": f"http://127.0.0.1:{closed}/fhir", "G0129_WEBHOOK_TOKEN": TOKEN,
        "G0129_DATA_DIR": str(tmp_path / "data"), "G0129_RETRY_MAX_ATTEMPTS": "1",
    }
    env.pop("G0129_LOG_FORMAT", None)
    env.pop("G0129_LOG_LEVEL", None)
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "adapter.cli", "serve", "--port", str(port)], env=env, cwd=ROOT, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz?token=s3cret-in-query", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        while '"event":"retry"' not in log.read_text():  # the catch-up at start meets the closed port
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    text = log.read_text()
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert "s3cret-in-query" not in text
    assert lines[0]["event"] == "start" and lines[0]["logger"] == "adapter"
    assert any(line["logger"] == "uvicorn.access" and line["path"] == "/healthz" for line in lines)
    [retry, *_] = [line for line in lines if line.get("event") == "retry"]
    assert retry["level"] == "warning" and retry["outcome"] == "pending" and retry["resource"] == "Subscription/catch-up"
