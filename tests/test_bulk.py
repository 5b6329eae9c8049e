"""The Bulk Data export client (adapter/bulk.py) through respx, and `replay --bulk-export`."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import respx

from adapter.auth import BearerAuth
from adapter.bulk import Export, Manifest, bulk_export, check_instant
from adapter.cli import main
from adapter.errors import (
    AuthError,
    BadManifest,
    ExportFailed,
    ExportRefused,
    ExportTimedOut,
    FatalFHIRError,
    UsageError,
)
from adapter.fhir_client import FHIRClient
from adapter.retry import RetryPolicy

from .conftest import FIXTURES

BASE = "http://ehr.test/fhir"
STATUS = f"{BASE}/$export-poll-status?_jobId=j1"
TYPES = ("Claim", "Encounter", "Organization", "Patient", "Practitioner")
EXPORT = FIXTURES / "43-iop-fqhc-bulk-export.ndjson"
# No waiting between retries in these tests; the polling pace is what they look at.
POLICY = RetryPolicy(max_attempts=2, base_delay=2.0, factor=2.0, max_delay=30.0, jitter=0.0, retry_after_cap=60.0)


def outcome(text: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": "processing", "diagnostics": text}]}


def manifest(output: list[tuple[str, str]], error: Sequence[str] = (), token: bool = True) -> dict[str, Any]:
    return {
        "transactionTime": "2026-11-28T10:00:00.000+00:00",
        "request": f"{BASE}/$export",
        "requiresAccessToken": token,
        "output": [{"type": t, "url": u} for t, u in output],
        "error": [{"type": "OperationOutcome", "url": u} for u in error],
    }


def by_type(path: Path) -> dict[str, bytes]:
    """An NDJSON export split one file per resource type, as a Bulk Data server writes it."""
    files: dict[str, bytes] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            rtype = orjson.loads(line)["resourceType"]
            files[rtype] = files.get(rtype, b"") + line + b"\n"
    return files


@pytest.fixture
def ehr() -> Iterator[respx.MockRouter]:
    # assert_all_mocked (respx's default) fails any request no route expects.
    with respx.mock(assert_all_called=False) as router:
        yield router


class Clock:
    """A fake monotonic clock that the fake sleep moves on."""

    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def export(tmp_path: Path, clock: Clock | None = None, auth: httpx.Auth | None = None, **options: Any) -> Export:
    clock = clock or Clock()

    async def go() -> Export:
        async with FHIRClient(BASE, auth=auth, retry=POLICY, sleep=clock.sleep) as client:
            return await bulk_export(client, tmp_path, TYPES, poll=POLICY, sleep=clock.sleep, now=clock.now, **options)

    return asyncio.run(go())


def kick_off(ehr: respx.MockRouter, path: str = "/$export", status: str = STATUS) -> respx.Route:
    return ehr.get(BASE + path).respond(202, headers={"Content-Location": status})


def test_kick_off_polls_as_told_downloads_every_file_and_cleans_up(ehr: respx.MockRouter, tmp_path: Path) -> None:
    files = by_type(EXPORT)
    start = kick_off(ehr)
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    status = ehr.get(STATUS).mock(side_effect=[
        httpx.Response(202, headers={"Retry-After": "5", "X-Progress": "10%"}),
        httpx.Response(202, headers={"Retry-After": later}),  # an HTTP date: ~30 s from now
        httpx.Response(202),  # no Retry-After: our own backoff (the third poll: 2 * 2**2 s)
        httpx.Response(200, json=manifest([(t, f"{BASE}/Binary/{t}") for t in files])),
    ])
    downloads = {t: ehr.get(f"{BASE}/Binary/{t}").respond(200, content=body, headers={"Content-Type": "application/fhir+ndjson"}) for t, body in files.items()}
    deleted = ehr.delete(STATUS).respond(202)
    clock = Clock()

    result = export(tmp_path, clock, since="2026-01-01T00:00:00Z")

    request = start.calls.last.request
    assert request.headers["Prefer"] == "respond-async"
    assert request.headers["Accept"] == "application/fhir+json"
    assert dict(request.url.params) == {
        "_outputFormat": "application/fhir+ndjson", "_type": ",".join(TYPES), "_since": "2026-01-01T00:00:00Z",
    }
    assert status.call_count == 4
    assert clock.slept[0] == 5 and 28 <= clock.slept[1] <= 30 and clock.slept[2] == 8
    assert all(r.calls.last.request.headers["Accept"] == "application/fhir+ndjson" for r in downloads.values())
    assert b"".join(p.read_bytes() for p in result.files) == b"".join(files.values()), "every file, byte for byte"
    assert all(p.parent == tmp_path and p.suffix == ".ndjson" for p in result.files)
    assert result.errors == () and result.transaction_time == "2026-11-28T10:00:00.000+00:00"
    assert deleted.call_count == 1


def test_credentials_go_with_the_files_only_when_the_manifest_asks(ehr: respx.MockRouter, tmp_path: Path) -> None:
    kick_off(ehr)
    ehr.get(STATUS).respond(200, json=manifest([("Patient", f"{BASE}/Binary/p")], token=True))
    ehr.delete(STATUS).respond(202)
    file = ehr.get(f"{BASE}/Binary/p").respond(200, content=b"")
    export(tmp_path, auth=BearerAuth("tok"))
    assert file.calls.last.request.headers["Authorization"] == "Bearer tok"

    signed = "https://files.example.com/export/p.ndjson?sig=abc"
    ehr.get(STATUS).respond(200, json=manifest([("Patient", signed)], token=False))
    bucket = ehr.get(signed).respond(200, content=b"")
    export(tmp_path, auth=BearerAuth("tok"))
    assert "Authorization" not in bucket.calls.last.request.headers


def test_our_token_never_goes_to_another_server(ehr: respx.MockRouter, tmp_path: Path) -> None:
    kick_off(ehr)
    ehr.get(STATUS).respond(200, json=manifest([("Patient", "https://elsewhere.test/p.ndjson")], token=True))
    ehr.delete(STATUS).respond(202)
    with pytest.raises(ExportFailed, match="not on http://ehr.test/fhir's server"):
        export(tmp_path, auth=BearerAuth("tok"))


def test_a_group_export_brings_the_shared_resources_from_the_system(ehr: respx.MockRouter, tmp_path: Path) -> None:
    group = kick_off(ehr, "/Group/g1/$export", f"{BASE}/$export-poll-status?_jobId=g")
    system = kick_off(ehr, "/$export", f"{BASE}/$export-poll-status?_jobId=s")
    ehr.get(f"{BASE}/$export-poll-status?_jobId=g").respond(200, json=manifest([("Patient", f"{BASE}/Binary/p")]))
    ehr.get(f"{BASE}/$export-poll-status?_jobId=s").respond(200, json=manifest([("Organization", f"{BASE}/Binary/o")]))
    ehr.delete(url__startswith=f"{BASE}/$export-poll-status").respond(202)
    ehr.get(f"{BASE}/Binary/p").respond(200, content=b'{"resourceType":"Patient","id":"p"}\n')
    ehr.get(f"{BASE}/Binary/o").respond(200, content=b'{"resourceType":"Organization","id":"o"}\n')

    result = export(tmp_path, group="g1")

    assert group.calls.last.request.url.params["_type"] == "Claim,Encounter,Patient"
    assert system.calls.last.request.url.params["_type"] == "Organization,Practitioner"
    assert [p.read_bytes()[:30] for p in result.files] == [b'{"resourceType":"Patient","id"', b'{"resourceType":"Organization"']


def test_a_patient_level_export_brings_the_shared_resources_from_the_system(ehr: respx.MockRouter, tmp_path: Path) -> None:
    patients = kick_off(ehr, "/Patient/$export", f"{BASE}/$export-poll-status?_jobId=p")
    system = kick_off(ehr, "/$export", f"{BASE}/$export-poll-status?_jobId=s")
    ehr.get(url__startswith=f"{BASE}/$export-poll-status").respond(200, json=manifest([]))
    ehr.delete(url__startswith=f"{BASE}/$export-poll-status").respond(202)

    assert export(tmp_path, patients=True, since="2026-01-01T00:00:00Z").files == ()

    assert patients.calls.last.request.url.params["_type"] == "Claim,Encounter,Patient"
    assert system.calls.last.request.url.params["_type"] == "Organization,Practitioner"
    assert system.calls.last.request.url.params["_since"] == "2026-01-01T00:00:00Z"


def test_the_error_files_outcomes_are_input_errors(ehr: respx.MockRouter, tmp_path: Path) -> None:
    kick_off(ehr)
    ehr.get(STATUS).respond(200, json=manifest([], error=[f"{BASE}/Binary/e"]))
    ehr.delete(STATUS).respond(202)
    lines = [outcome("Claim/c7: could not be read"), outcome("12 resources exported", "information"), {"resourceType": "Patient"}]
    ehr.get(f"{BASE}/Binary/e").respond(200, content=b"\n".join(orjson.dumps(o) for o in lines) + b"\n{oops\n")

    result = export(tmp_path)

    assert result.files == ()
    assert [str(e) for e in result.errors] == [
        f"{BASE}/Binary/e:1: the server could not export: Claim/c7: could not be read",
        f"{BASE}/Binary/e:3: bulk export error file line is not an OperationOutcome",
        f"{BASE}/Binary/e:4: bulk export error file line is not JSON",
    ]


def test_a_refused_kick_off_says_why_in_one_line(ehr: respx.MockRouter, tmp_path: Path) -> None:
    ehr.get(f"{BASE}/$export").respond(400, json=outcome('Invalid date/time format: "yesterday"'))
    with pytest.raises(ExportRefused) as refused:
        export(tmp_path)
    assert str(refused.value) == f'bulk export kick-off refused: GET {BASE}/$export answered 400: Invalid date/time format: "yesterday"'
    assert refused.value.status == 400 and "\n" not in str(refused.value)
    ehr.get(f"{BASE}/$export").respond(200, json={"resourceType": "Bundle"})  # a server without async export
    with pytest.raises(ExportRefused, match="answered 200 without a status URL"):
        export(tmp_path)
    ehr.get(f"{BASE}/$export").respond(401)
    with pytest.raises(AuthError):
        export(tmp_path)


def test_a_failed_export_says_what_the_server_said_and_cancels(ehr: respx.MockRouter, tmp_path: Path) -> None:
    kick_off(ehr)
    ehr.get(STATUS).respond(500, json=outcome("HAPI-2222: Resource type [Organization] is not eligible"))
    deleted = ehr.delete(STATUS).respond(404, json=outcome("already completed"))  # a failed clean-up changes nothing
    with pytest.raises(ExportFailed, match=r"^bulk export failed: GET .* answered 500: HAPI-2222: Resource type \[Organization\]"):
        export(tmp_path)
    assert deleted.call_count == 1


def test_an_export_that_never_finishes_times_out_within_the_bound_and_is_cancelled(ehr: respx.MockRouter, tmp_path: Path) -> None:
    kick_off(ehr)
    ehr.get(STATUS).respond(202, headers={"Retry-After": "120", "X-Progress": "Build in progress"})
    deleted = ehr.delete(STATUS).respond(202)
    clock = Clock()
    with pytest.raises(ExportTimedOut, match=r"^bulk export not complete after 300 s \(Build in progress\)"):
        export(tmp_path, clock, max_wait=300)
    # Retry-After 120 is capped at 60 (retry_after_cap); the last wait ends at the bound.
    assert clock.slept == [60.0] * 5 and clock.t == 300
    assert deleted.call_count == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>", "is not JSON"),
        (b"[]", "is not a JSON object"),
        (orjson.dumps({"requiresAccessToken": True, "output": []}), "has no transactionTime"),
        (orjson.dumps({"transactionTime": "t", "requiresAccessToken": "yes", "output": []}), "requiresAccessToken must be true or false"),
        (orjson.dumps({"transactionTime": "t", "requiresAccessToken": True, "output": {}}), "output is not a list"),
        (orjson.dumps({"transactionTime": "t", "requiresAccessToken": True, "output": [{"type": "Patient"}]}), r"output\[0\] needs a resource type and an http\(s\) url"),
        (orjson.dumps({"transactionTime": "t", "requiresAccessToken": True, "output": [{"type": "../../x", "url": BASE}]}), r"output\[0\] needs a resource type"),
        (orjson.dumps({"transactionTime": "t", "requiresAccessToken": True, "output": [], "error": [{"type": "OperationOutcome", "url": "file:///etc/passwd"}]}), r"error\[0\] needs"),
    ],
)
def test_a_bad_manifest_is_named(body: bytes, message: str) -> None:
    with pytest.raises(BadManifest, match=message):
        Manifest.parse(body, STATUS)


def test_a_manifest_without_errors_may_leave_the_list_out() -> None:
    parsed = Manifest.parse(orjson.dumps({"transactionTime": "t", "requiresAccessToken": False, "output": []}), STATUS)
    assert parsed == Manifest("t", False, (), ())


def test_a_status_url_on_another_server_is_refused(ehr: respx.MockRouter, tmp_path: Path) -> None:
    kick_off(ehr, status="https://elsewhere.test/status/1")
    with pytest.raises(FatalFHIRError, match="not sending our credentials there"):
        export(tmp_path)


@pytest.mark.parametrize("value", ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.123+05:30"])
def test_since_is_a_fhir_instant(value: str) -> None:
    assert check_instant(value) == value


@pytest.mark.parametrize("value", ["2026-01-01", "2026-01-01T00:00Z", "2026-02-30T00:00:00Z", "yesterday", "2026-01-01T00:00:00"])
def test_since_that_is_no_instant_is_a_usage_error(value: str) -> None:
    with pytest.raises(UsageError, match="--since must be a FHIR instant"):
        check_instant(value)


# -- g0129 replay --bulk-export ------------------------------------------------------------------


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_replay_of_an_export_decides_as_replay_of_the_same_files(ehr: respx.MockRouter, tmp_path: Path) -> None:
    files = by_type(EXPORT)
    kick_off(ehr)
    ehr.get(STATUS).respond(200, json=manifest([(t, f"{BASE}/Binary/{t}") for t in files]))
    ehr.delete(STATUS).respond(202)
    for t, body in files.items():
        ehr.get(f"{BASE}/Binary/{t}").respond(200, content=body)

    code, out, err = run("replay", "--bulk-export", BASE, "--out", str(tmp_path / "bulk"))
    assert code == 0, err
    assert f"bulk export of {BASE}: {len(files)} file(s), as of 2026-11-28T10:00:00.000+00:00" in out
    assert run("replay", str(EXPORT), "--out", str(tmp_path / "files"))[0] == 0
    for name in ("decisions.ndjson", "claims.ndjson", "errors.ndjson", "review.csv"):
        assert (tmp_path / "bulk" / name).read_bytes() == (tmp_path / "files" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "bulk").iterdir()) == [
        ".g0129-lock", "claims.ndjson", "decisions.ndjson", "errors.ndjson", "review.csv"
    ], "the download is gone"


def test_replay_reports_the_exports_errors_and_exits_1(ehr: respx.MockRouter, tmp_path: Path) -> None:
    kick_off(ehr)
    ehr.get(STATUS).respond(200, json=manifest([("Patient", f"{BASE}/Binary/p")], error=[f"{BASE}/Binary/e"]))
    ehr.delete(STATUS).respond(202)
    ehr.get(f"{BASE}/Binary/p").respond(200, content=EXPORT.read_bytes())
    ehr.get(f"{BASE}/Binary/e").respond(200, content=orjson.dumps(outcome("Claim/c7: could not be read")) + b"\n")

    code, out, err = run("replay", "--bulk-export", BASE, "--out", str(tmp_path))

    assert code == 1
    assert err == f"error: {BASE}/Binary/e:1: the server could not export: Claim/c7: could not be read\n"
    assert orjson.loads((tmp_path / "errors.ndjson").read_bytes())["source"] == f"{BASE}/Binary/e:1"
    assert (tmp_path / "decisions.ndjson").read_bytes(), "the rest is still decided"


def test_an_export_with_nothing_new_is_a_run_with_nothing_to_decide(ehr: respx.MockRouter, tmp_path: Path) -> None:
    kick_off(ehr)
    ehr.get(STATUS).respond(200, json=manifest([]))
    ehr.delete(STATUS).respond(202)
    code, out, err = run("replay", "--bulk-export", BASE, "--since", "2026-11-27T00:00:00Z", "--out", str(tmp_path))
    assert (code, err) == (0, "")
    assert "bulk export of http://ehr.test/fhir: 0 file(s)" in out and "encounters: 0 seen" in out
    assert [(tmp_path / n).read_bytes() for n in ("decisions.ndjson", "claims.ndjson", "errors.ndjson")] == [b"", b"", b""]


def test_a_failed_export_is_one_line_and_exit_1(ehr: respx.MockRouter, tmp_path: Path) -> None:
    ehr.get(f"{BASE}/Group/nope/$export").respond(404, json=outcome("HAPI-2001: Resource Group/nope is not known"))
    code, out, err = run("replay", "--bulk-export", BASE, "--group", "nope", "--out", str(tmp_path / "o"))
    assert code == 1
    assert err.startswith("g0129: bulk export kick-off refused: GET ") and err.endswith("answered 404: HAPI-2001: Resource Group/nope is not known\n")
    assert not list((tmp_path / "o").glob(".g0129-bulk-*")), "the download directory is gone"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--since", "2026-01-01T00:00:00Z", str(EXPORT)], "--since needs --bulk-export"),
        (["--group", "g1", str(EXPORT)], "--group needs --bulk-export"),
        ([], "say what to replay: PATH... (files or directories), or --bulk-export URL"),
        (["--bulk-export", "ehr.test/fhir"], "--bulk-export must be an http(s) URL, got 'ehr.test/fhir'"),
        (["--bulk-export", BASE, "--since", "2026-01-01"], "--since must be a FHIR instant"),
        (["--bulk-export", BASE, "--group", "a/b"], "--group must be a FHIR id"),
    ],
)
def test_bulk_usage_errors_exit_2_before_any_request(argv: list[str], message: str, tmp_path: Path) -> None:
    with respx.mock:  # any request at all fails the test
        code, out, err = run("replay", *argv, "--out", str(tmp_path / "o"))
    assert (code, out) == (2, "")
    assert err.startswith("g0129: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
