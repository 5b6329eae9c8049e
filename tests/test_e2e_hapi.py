"""End to end against a real HAPI FHIR server: HAPI notifies, the adapter decides and writes back.

Needs `scripts/fhir-server up` (HAPI on 127.0.0.1:8080/fhir); `.ci/run` starts it and sets
G0129_E2E_REQUIRED=1 so a missing server fails the run instead of skipping these tests.
The adapter runs as a real `g0129 serve` process. It reaches HAPI through a small forwarding
proxy of the test's own, which lets one test slip a biller's edit in just before the adapter's
write, the only way to make a real version conflict happen on cue.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from adapter import jsonio
from adapter.ingest import load_paths
from adapter.pipeline import evaluate
from adapter.ruleset import load_ruleset
from adapter.vocabulary import DECISION_EXTENSION, DRAFT_IDENTIFIER_SYSTEM, TAG_SYSTEM, TASK_IDENTIFIER_SYSTEM, ehr_view

from .conftest import FIXTURES, ROOT, annotated, php_day_transaction, wait_for
from .fakefhir import rewrite_references

HAPI = os.environ.get("G0129_E2E_FHIR_BASE", "http://127.0.0.1:8080/fhir")
TOKEN = "e2e-webhook-token"
# The billing team the review Tasks are assigned to (G0129_REVIEW_OWNER); made on HAPI first,
# since HAPI refuses a reference to a resource it does not have.
OWNER = "Organization/e2e-billing-team"
TEMPLATE = FIXTURES / "01-medicare-php-hospital.json"


def _hapi_up() -> bool:
    try:
        return httpx.get(f"{HAPI}/metadata", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("G0129_E2E_REQUIRED") != "1" and not _hapi_up(),
        reason=f"no FHIR server at {HAPI} (scripts/fhir-server up)",
    ),
]

fhir = httpx.Client(base_url=HAPI, timeout=30, headers={"Content-Type": "application/fhir+json"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the proxy -----------------------------------------------------------------------------------


class Proxy:
    """Forwards every request to HAPI. `hooks` run (once each) before forwarding a transaction."""

    def __init__(self) -> None:
        self.hooks: list[Callable[[dict[str, Any]], None]] = []
        upstream = self.upstream = httpx.Client(base_url=HAPI.removesuffix("/fhir"), timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and self.path.rstrip("/").endswith("/fhir") and body and proxy.hooks:
                    bundle = orjson.loads(body)
                    if bundle.get("type") == "transaction":
                        proxy.hooks.pop(0)(bundle)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = upstream.request(self.command, self.path, content=body, headers=headers)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()


# -- the adapter process -------------------------------------------------------------------------


class Adapter:
    def __init__(self, data_dir: Path, fhir_base: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "G0129_FHIR_BASE_URL": fhir_base,
            "G0129_WEBHOOK_TOKEN": TOKEN,
            "G0129_DATA_DIR": str(data_dir),
            "G0129_CATCHUP_INTERVAL": "10",
            "G0129_REVIEW_OWNER": OWNER,
        }
        self.log = data_dir.parent / "adapter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "adapter.cli", "serve", "--port", str(self.port), "--log-level", "warning"],
                env=self.env, cwd=ROOT, stdout=sink, stderr=sink,
            )
        wait_for("the adapter to start", self.alive, timeout=30, every=0.2)

    def alive(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def notify(self, resource: dict[str, Any]) -> httpx.Response:
        return httpx.put(
            f"{self.url}/notify/{resource['resourceType']}/{resource['id']}",
            content=orjson.dumps(resource),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"},
        )


def g0129(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapter.cli", *args], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    fhir.close()


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.close()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, proxy: Proxy) -> Iterator[tuple[Adapter, subprocess.CompletedProcess[str]]]:
    data = tmp_path_factory.mktemp("adapter") / "data"
    team = {"resourceType": "Organization", "id": OWNER.split("/")[1], "active": True, "name": "Billing office (G0129 review)"}
    assert fhir.put(f"/{OWNER}", content=orjson.dumps(team)).status_code in (200, 201)
    a = Adapter(data, proxy.base)
    a.start()
    subscribed = g0129(
        "subscribe", "--endpoint", f"{a.url}/notify", "--fhir-base", HAPI, "--wait", "60",
        env={"G0129_WEBHOOK_TOKEN": TOKEN},
    )
    yield a, subscribed
    a.stop()
    # A Subscription left pointing at a closed port fills HAPI's log with failed deliveries.
    for rtype in ("encounter", "procedure", "claim", "task"):
        fhir.delete(f"/Subscription/g0129-{rtype}")


# -- data ----------------------------------------------------------------------------------------


def php_day(change: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> tuple[str, dict[str, Any]]:
    return php_day_transaction(HAPI, change)


def post_transaction(bundle: dict[str, Any]) -> dict[str, Any]:
    r = fhir.post("", content=orjson.dumps(bundle))
    assert r.status_code == 200, r.text
    return r.json()


def claim(prefix: str) -> dict[str, Any]:
    r = fhir.get(f"/Claim/{prefix}-claim")
    assert r.status_code == 200, r.text
    return r.json()


def wait_annotated(prefix: str, timeout: float = 60.0) -> dict[str, Any]:
    return wait_for(f"Claim/{prefix}-claim to be annotated", lambda: (lambda c: c if annotated(c) else None)(claim(prefix)), timeout)


def provenances(target: str) -> int:
    bundle = fhir.get("/Provenance", params={"target": target, "_summary": "count"}).json()
    return int(bundle.get("total", 0))


def decision_of(c: dict[str, Any], encounter: str) -> dict[str, Any]:
    for ext in c.get("extension", []):
        if ext["url"] == DECISION_EXTENSION:
            parts = ext["extension"]
            if {"url": "encounter", "valueReference": {"reference": encounter}} in parts:
                return {"outcome": next(p["valueCode"] for p in parts if p["url"] == "outcome"),
                        "rules": [p["valueCode"] for p in parts if p["url"] == "rule"]}
    raise AssertionError(f"no decision for {encounter} on the Claim")


def g0129_lines(c: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in c.get("item", []) if any(x.get("code") == "G0129" for x in i["productOrService"].get("coding", []))]


# -- the tests, in the order a deployment meets them ---------------------------------------------


def test_subscribe_makes_active_subscriptions(adapter: tuple[Adapter, Any]) -> None:
    _, subscribed = adapter
    assert subscribed.returncode == 0, subscribed.stdout + subscribed.stderr
    for rtype in ("encounter", "procedure", "claim", "task"):
        sub = fhir.get(f"/Subscription/g0129-{rtype}").json()
        assert sub["status"] == "active"
        assert sub["channel"]["header"] == [f"Authorization: Bearer {TOKEN}"]
    again = g0129("subscribe", "--endpoint", f"{adapter[0].url}/notify", "--fhir-base", HAPI, "--wait", "30",
                  env={"G0129_WEBHOOK_TOKEN": TOKEN})
    assert again.stdout.count(": unchanged, active") == 4


def test_php_day_is_annotated_once_and_does_not_loop(adapter: tuple[Adapter, Any]) -> None:
    prefix, bundle = php_day()
    post_transaction(bundle)
    c = wait_annotated(prefix)
    lines = g0129_lines(c)
    assert [(l["quantity"]["value"], l["servicedDate"], l["revenue"]["coding"][0]["code"]) for l in lines] == [(1, "2025-03-04", "0430")]
    assert decision_of(c, f"Encounter/{prefix}-enc")["outcome"] == "bill"
    assert provenances(f"Claim/{prefix}-claim") == 1
    version = c["meta"]["versionId"]
    time.sleep(15)  # several catch-up rounds and any echo of our own write
    assert claim(prefix)["meta"]["versionId"] == version, "the adapter looped on its own write"
    assert provenances(f"Claim/{prefix}-claim") == 1


def test_biller_edit_during_write_back_is_kept(adapter: tuple[Adapter, Any], proxy: Proxy) -> None:
    prefix, bundle = php_day()
    note = "Biller: hold until the physician certification is signed."

    def biller_edits(transaction: dict[str, Any]) -> None:
        current = claim(prefix)
        current["supportingInfo"].append({"sequence": 99, "category": {"coding": [{"code": "info"}]}, "valueString": note})
        r = fhir.put(f"/Claim/{prefix}-claim", content=orjson.dumps(current))
        assert r.status_code == 200, r.text

    proxy.hooks.append(biller_edits)
    post_transaction(bundle)
    c = wait_annotated(prefix)
    time.sleep(5)  # let the notification about the biller's own version be handled too
    c = claim(prefix)
    assert any(s.get("valueString") == note for s in c["supportingInfo"]), "the biller's change was overwritten"
    assert len(g0129_lines(c)) == 1
    assert provenances(f"Claim/{prefix}-claim") == 1
    assert not proxy.hooks, "the adapter's write went through the conflict"


def test_duplicate_notifications_lead_to_one_write(adapter: tuple[Adapter, Any]) -> None:
    a, _ = adapter
    prefix, bundle = php_day()
    post_transaction(bundle)
    encounter = fhir.get(f"/Encounter/{prefix}-enc").json()
    assert a.notify(encounter).status_code == 200
    assert a.notify(encounter).status_code == 200
    c = wait_annotated(prefix)
    time.sleep(5)
    assert claim(prefix)["meta"]["versionId"] == c["meta"]["versionId"] == "2"
    assert provenances(f"Claim/{prefix}-claim") == 1


def test_session_without_end_time_is_review_and_the_service_keeps_running(adapter: tuple[Adapter, Any]) -> None:
    a, _ = adapter

    def open_session(r: dict[str, dict[str, Any]]) -> None:
        del r["ot1"]["performedPeriod"]["end"]

    prefix, bundle = php_day(open_session)
    post_transaction(bundle)
    c = wait_annotated(prefix)
    decision = decision_of(c, f"Encounter/{prefix}-enc")
    assert decision["outcome"] == "review" and "SESSION-TIMES" in decision["rules"]
    assert g0129_lines(c) == []
    # A person is asked: one Task for the Claim, written with it, for the billing team.
    tasks = fhir.get("/Task", params={"identifier": f"{TASK_IDENTIFIER_SYSTEM}|Claim/{prefix}-claim"}).json()
    assert tasks["total"] == 1
    task = tasks["entry"][0]["resource"]
    assert (task["status"], task["focus"], task["for"], task["owner"]) == (
        "requested", {"reference": f"Claim/{prefix}-claim"}, {"reference": f"Patient/{prefix}-pat"}, {"reference": OWNER}
    )
    assert [c["code"] for c in task["reasonCode"]["coding"]] == ["SESSION-TIMES"]
    assert validation_errors(task) == []
    assert a.alive()


def test_a_biller_approves_a_review_and_the_claim_is_billed(adapter: tuple[Adapter, Any]) -> None:
    def coverage_ended(r: dict[str, dict[str, Any]]) -> None:
        r["cov"]["period"] = {"start": "2024-01-01", "end": "2025-02-28"}  # before the session

    prefix, bundle = php_day(coverage_ended)
    post_transaction(bundle)
    c = wait_annotated(prefix)
    assert decision_of(c, f"Encounter/{prefix}-enc")["outcome"] == "review" and g0129_lines(c) == []
    search = {"identifier": f"{TASK_IDENTIFIER_SYSTEM}|Claim/{prefix}-claim"}
    task = fhir.get("/Task", params=search).json()["entry"][0]["resource"]
    assert task["status"] == "requested" and [c["code"] for c in task["reasonCode"]["coding"]] == ["COVERAGE"]

    # A biller approves it on the FHIR server, as an EHR's worklist would: HAPI notifies us.
    biller = {"resourceType": "Practitioner", "id": f"{prefix}-biller", "name": [{"family": "Biller", "given": ["Dana"]}]}
    assert fhir.put(f"/Practitioner/{prefix}-biller", content=orjson.dumps(biller)).status_code == 201
    answer = {"system": "https://g0129-adapter.org/fhir/CodeSystem/task-codes"}
    task |= {
        "status": "completed",
        "owner": {"reference": f"Practitioner/{prefix}-biller", "display": "Dana Biller"},
        "executionPeriod": {"end": "2026-11-28T10:00:00Z"},
        "output": [{"type": {"coding": [answer | {"code": "answer"}]}, "valueCodeableConcept": {"coding": [answer | {"code": "approve"}]}}],
    }
    r = fhir.put(f"/Task/{task['id']}", content=orjson.dumps(task))
    assert r.status_code == 200, r.text
    c = wait_for("the approved Claim billed", lambda: (lambda c: c if g0129_lines(c) else None)(claim(prefix)), 60)
    decision = decision_of(c, f"Encounter/{prefix}-enc")
    assert decision["outcome"] == "bill" and "REVIEW" in decision["rules"]
    assert [(l["quantity"]["value"], l["servicedDate"]) for l in g0129_lines(c)] == [(1, "2025-03-04")]
    time.sleep(5)  # any echo of our write
    done = fhir.get(f"/Task/{task['id']}").json()
    assert (done["status"], done["meta"]["versionId"]) == ("completed", "2"), "the biller's Task was left as it was"
    provenance = fhir.get("/Provenance", params={"target": f"Claim/{prefix}-claim", "_sort": "-_lastUpdated"}).json()["entry"][0]["resource"]
    assert f"Task/{task['id']}/_history/2" in [e["what"]["reference"] for e in provenance["entity"]]
    assert {"reference": f"Practitioner/{prefix}-biller", "display": "Dana Biller"} in [a["who"] for a in provenance["agent"]]
    assert [e for r in (c, done, provenance) for e in validation_errors(r)] == []


def test_catch_up_after_downtime_processes_every_encounter_once(adapter: tuple[Adapter, Any]) -> None:
    a, _ = adapter
    a.stop()
    prefixes = []
    for _ in range(20):
        prefix, bundle = php_day()
        post_transaction(bundle)
        prefixes.append(prefix)
    time.sleep(2)
    a.start()
    for prefix in prefixes:
        wait_annotated(prefix, timeout=180)
    time.sleep(5)
    for prefix in prefixes:
        assert claim(prefix)["meta"]["versionId"] == "2", prefix
        assert provenances(f"Claim/{prefix}-claim") == 1, prefix


def _fixture_entries(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".ndjson":
        return [{"resource": orjson.loads(line)} for line in path.read_bytes().splitlines() if line.strip()]
    return orjson.loads(path.read_bytes())["entry"]  # type: ignore[no-any-return]


def _fixture_resources(path: Path) -> list[dict[str, Any]]:
    return [e["resource"] for e in _fixture_entries(path)]


def _fixture_transaction(path: Path) -> dict[str, Any]:
    """A fixture as a transaction of PUTs under its own ids; its fullUrls are kept, so
    `urn:uuid:` references inside it resolve."""
    entries = _fixture_entries(path)
    out = []
    for entry in entries:
        r = entry["resource"]
        url = f"{r['resourceType']}/{r['id']}"
        out.append({"fullUrl": entry.get("fullUrl") or f"{HAPI}/{url}", "resource": r, "request": {"method": "PUT", "url": url}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": out}


def _comparable(c: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in c.items() if k != "meta"}
    meta = {k: v for k, v in (c.get("meta") or {}).items() if k not in ("versionId", "lastUpdated", "source")}
    return out | ({"meta": meta} if meta else {})


def _exact(c: dict[str, Any]) -> bytes:
    """A Claim as JSON text, keys sorted, decimals as written: equal means digit for digit."""
    return jsonio.dumps(_comparable(c), option=orjson.OPT_SORT_KEYS)


_HAS_DECIMALS = re.compile(rb":\s*-?[0-9]+\.[0-9]")


def _ehr_part(c: dict[str, Any]) -> bytes:
    """What the EHR wrote in a Claim: our lines, additions, flags, decisions and tag set aside,
    the values we corrected put back; as exact JSON text."""
    view = ehr_view(c)
    extensions = [e for e in view.get("extension", []) if e.get("url") != DECISION_EXTENSION]
    view = {k: v for k, v in view.items() if k not in ("meta", "extension")} | ({"extension": extensions} if extensions else {})
    return jsonio.dumps(view, option=orjson.OPT_SORT_KEYS)


def validation_errors(resource: dict[str, Any]) -> list[str]:
    """What HAPI's `$validate` finds wrong with a resource (severity error or fatal), against
    the R4 base and our published definitions (scripts/fhir-server loads conformance/)."""
    outcome = fhir.post(f"/{resource['resourceType']}/$validate", content=jsonio.dumps(resource)).json()
    return [
        f"{resource['resourceType']}/{resource.get('id')}: {i.get('diagnostics')} at {i.get('expression')}"
        for i in outcome.get("issue", [])
        if i["severity"] in ("error", "fatal")
    ]


def ours(rtype: str) -> list[dict[str, Any]]:
    """Every resource of a type on HAPI that carries our tag: what the adapter wrote."""
    bundle = fhir.get(f"/{rtype}", params={"_tag": f"{TAG_SYSTEM}|annotated", "_count": "1000"}).json()
    assert "next" not in {link["relation"] for link in bundle.get("link", [])}
    return [jsonio.loads(jsonio.dumps(e["resource"])) for e in bundle.get("entry", [])]


def _version(key: str, version: str) -> dict[str, Any]:
    return jsonio.loads(fhir.get(f"/{key}/_history/{version}").content)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "name",
    [
        "08-claim-two-php-days",  # one Claim, two days: one transaction, not one per day
        "45-r5-claim-encounter-extension",  # linked only by the R5 extension: found, no draft beside it
        "47-synthea-pharmacy-and-institutional-claims",  # the institutional Claim, never the pharmacy one
        "59-claim-with-decimals-and-vendor-extensions",  # what the EHR wrote comes back digit for digit
    ],
)
def test_the_sidecar_writes_what_replay_writes_once_per_claim(adapter: tuple[Adapter, Any], tmp_path: Path, name: str) -> None:
    source = FIXTURES / f"{name}.json"
    old = orjson.loads(source.read_bytes())["entry"][0]["resource"]["id"].split("-")[0]
    prefix = f"e{uuid.uuid4().hex[:10]}"
    copy = tmp_path / source.name
    copy.write_bytes(source.read_bytes().replace(f"{old}-".encode(), f"{prefix}-".encode()))
    transaction = _fixture_transaction(copy)
    # HAPI stores a reference to a fullUrl of the transaction as Type/id.
    rewrites = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in transaction["entry"]}
    index, _, _ = load_paths([copy])
    expected = evaluate(index, load_ruleset()).claims
    assert expected
    post_transaction(transaction)
    for want in expected:
        target = rewrite_references(want.resource, rewrites)
        n = len(want.decisions)
        c = wait_for(
            f"{want.key} annotated with {n} decision(s)",
            lambda: (lambda c: c if sum(e["url"] == DECISION_EXTENSION for e in c.get("extension", [])) == n else None)(fhir.get(f"/{want.key}").json()),
            60,
        )
        time.sleep(5)  # every notification of the load handled, and any echo of our write
        c = jsonio.loads(fhir.get(f"/{want.key}").content)
        assert c["meta"]["versionId"] == "2", "one write for the Claim, whatever the number of days it bills"
        assert provenances(want.key) == 1
        # Nothing the EHR wrote changed, digit for digit, as the server holds it (HAPI itself
        # writes 125.00 back as 125.0: that is the server's reading, and we keep it).
        assert _ehr_part(c) == _ehr_part(_version(want.key, "1"))
        if not _HAS_DECIMALS.search(source.read_bytes()):  # else HAPI's 125.0 meets the file's 125.00
            assert _exact(c) == _exact(target), "the sidecar wrote another Claim than replay"
        provenance = fhir.get("/Provenance", params={"target": want.key}).json()["entry"][0]["resource"]
        assert provenance["target"] == [{"reference": f"{want.key}/_history/2"}]
        assert all("/_history/" in e["what"]["reference"] for e in provenance["entity"])
        assert {e["what"]["reference"] for e in provenance["entity"]} >= {f"{want.key}/_history/1"} | {
            f"{case.encounter}/_history/1" for case in want.cases
        }
    for case in (c for want in expected for c in want.cases):
        drafts = fhir.get("/Claim", params={"identifier": f"{DRAFT_IDENTIFIER_SYSTEM}|{case.encounter}"}).json()
        assert drafts.get("total", 0) == 0, "a draft beside the EHR's Claim"
    written = {want.key for want in expected}
    for entry in transaction["entry"]:
        r = entry["resource"]
        if r["resourceType"] == "Claim" and f"Claim/{r['id']}" not in written:
            other = fhir.get(f"/Claim/{r['id']}").json()
            assert other["meta"]["versionId"] == "1" and not annotated(other), "a pharmacy Claim was annotated"


def test_replay_fixtures_to_hapi(adapter: tuple[Adapter, Any], tmp_path: Path) -> None:
    a, _ = adapter
    a.stop()  # replay alone writes here: no notification-driven annotation on the side
    for rtype in ("encounter", "procedure", "claim", "task"):
        fhir.delete(f"/Subscription/g0129-{rtype}")
    # fixtures/ holds valid input only (HAPI would refuse fixtures-invalid/, as any FHIR server would).
    for path in sorted(FIXTURES.iterdir()):
        if path.suffix in (".json", ".ndjson") and ".expected." not in path.name:
            post_transaction(_fixture_transaction(path))
    done = g0129("replay", str(FIXTURES), "--out", str(tmp_path), "--fhir-base", HAPI, env={"G0129_REVIEW_OWNER": OWNER})
    assert done.returncode == 0, done.stdout + done.stderr
    decisions = [orjson.loads(line) for line in (tmp_path / "decisions.ndjson").read_bytes().splitlines()]
    for d in decisions:
        if d["claim"]:
            c = fhir.get(f"/{d['claim']}").json()
        else:
            found = fhir.get("/Claim", params={"identifier": f"{DRAFT_IDENTIFIER_SYSTEM}|{d['encounter']}"}).json()
            assert found.get("total") == 1, d["encounter"]
            c = found["entry"][0]["resource"]
        assert annotated(c), d["encounter"]
        assert decision_of(c, d["encounter"])["outcome"] == d["outcome"]
        if d["outcome"] == "bill":  # a review's lines wait in the decision extension
            assert len(g0129_lines(c)) >= len(d["lines"])
    # replay --fhir-base changes nothing the EHR wrote, digit for digit (decimals, vendor extensions).
    written = jsonio.loads(fhir.get("/Claim/php59-claim").content)
    assert int(written["meta"]["versionId"]) >= 2
    assert _ehr_part(written) == _ehr_part(_version("Claim/php59-claim", str(int(written["meta"]["versionId"]) - 1)))
    again = g0129("replay", str(FIXTURES), "--out", str(tmp_path), "--fhir-base", HAPI, env={"G0129_REVIEW_OWNER": OWNER})
    assert again.returncode == 0 and ": updated" not in again.stdout and ": created" not in again.stdout
    # Everything the adapter wrote here (and in the tests before) is valid against R4 and our
    # published definitions: zero errors from HAPI's validator.
    written = {rtype: ours(rtype) for rtype in ("Claim", "Provenance", "Task")}
    assert len(written["Claim"]) >= len({d["claim"] or d["encounter"] for d in decisions})
    assert len(written["Provenance"]) >= len(written["Claim"])
    # A review Task for each EHR Claim under review, which the fixtures' load has just put back as
    # the EHR wrote it (a draft of ours a run against the same HAPI annotated before is unchanged
    # now, so its Task is what that run wrote: tests/test_parity.py checks drafts' Tasks).
    for key in {d["claim"] for d in decisions if d["outcome"] == "review" and d["claim"]}:
        tasks = fhir.get("/Task", params={"identifier": f"{TASK_IDENTIFIER_SYSTEM}|{key}"}).json()
        assert tasks["total"] == 1, key
        assert tasks["entry"][0]["resource"]["focus"] == {"reference": key}
    assert [e for resources in written.values() for r in resources for e in validation_errors(r)] == []


# -- Bulk Data export as replay's input ----------------------------------------------------------

# HAPI answers every status poll with Retry-After: 120; its test server is done in seconds.
BULK_ENV = {"G0129_RETRY_AFTER_CAP": "1", "G0129_BULK_EXPORT_MAX_WAIT": "300"}


def _fresh_copies(paths: list[Path], folder: Path) -> list[Path]:
    """Each fixture under ids of its own (its id prefix, e.g. `php01-`, made unique), loaded into
    HAPI; returns the copies, which replay reads from files."""
    run = f"b{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    copies = []
    for path in paths:
        raw = path.read_bytes()
        first = (orjson.loads(raw.splitlines()[0]) if path.suffix == ".ndjson" else orjson.loads(raw)["entry"][0]["resource"])["id"]
        old = first.split("-")[0]
        copy = folder / path.name
        copy.write_bytes(raw.replace(f"{old}-".encode(), f"{run}{old}-".encode()))
        post_transaction(_fixture_transaction(copy))
        copies.append(copy)
    return copies


def _decisions(out: Path) -> dict[str, dict[str, Any]]:
    decisions = [orjson.loads(line) for line in (out / "decisions.ndjson").read_bytes().splitlines()]
    by_encounter = {d["encounter"]: d for d in decisions}
    assert len(by_encounter) == len(decisions)
    return by_encounter


def _server_now() -> str:
    """The FHIR server's clock (a Date header), a second back: the --since of what comes next."""
    date = httpx.get(f"{HAPI}/metadata", params={"_summary": "true"}, timeout=30).headers["Date"]
    return (parsedate_to_datetime(date) - timedelta(seconds=1)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_server_offers_bulk_export_on_the_system_patient_and_group() -> None:
    rest = fhir.get("/metadata").json()["rest"][0]
    assert "export" in {o["name"] for o in rest.get("operation", [])}
    for resource in rest["resource"]:
        if resource["type"] in ("Patient", "Group"):
            assert "export" in {o["name"] for o in resource.get("operation", [])}, resource["type"]


def test_replay_of_a_bulk_export_decides_as_replay_of_the_same_files(tmp_path: Path) -> None:
    since = _server_now()
    valid = [p for p in sorted(FIXTURES.iterdir()) if p.suffix in (".json", ".ndjson") and ".expected." not in p.name]
    copies = _fresh_copies(valid, tmp_path / "fixtures")
    exported = g0129("replay", "--bulk-export", HAPI, "--since", since, "--out", str(tmp_path / "bulk"), env=BULK_ENV)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert f"bulk export of {HAPI}: " in exported.stdout
    files = g0129("replay", str(tmp_path / "fixtures"), "--out", str(tmp_path / "files"))
    assert files.returncode == 0, files.stdout + files.stderr
    want = _decisions(tmp_path / "files")
    assert len(want) >= len(copies)
    # --since: the export holds what was loaded since, and only that.
    assert _decisions(tmp_path / "bulk") == want
    assert not list((tmp_path / "bulk").glob(".g0129-bulk-*")), "the download is removed"


def test_replay_of_a_groups_bulk_export_decides_for_its_two_patients(tmp_path: Path) -> None:
    two = [FIXTURES / "01-medicare-php-hospital.json", FIXTURES / "43-iop-fqhc-bulk-export.ndjson"]
    copies = _fresh_copies(two, tmp_path / "fixtures")
    patients = [r["id"] for c in copies for r in _fixture_resources(c) if r["resourceType"] == "Patient"]
    assert len(patients) == 2
    group = {
        "resourceType": "Group", "id": f"g{uuid.uuid4().hex[:10]}", "type": "person", "actual": True,
        "member": [{"entity": {"reference": f"Patient/{p}"}} for p in patients],
    }
    assert fhir.put(f"/Group/{group['id']}", content=orjson.dumps(group)).status_code == 201
    exported = g0129("replay", "--bulk-export", HAPI, "--group", group["id"], "--out", str(tmp_path / "bulk"), env=BULK_ENV)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    files = g0129("replay", *map(str, copies), "--out", str(tmp_path / "files"))
    assert files.returncode == 0, files.stdout + files.stderr
    want = _decisions(tmp_path / "files")
    assert len(want) == 2
    # Only the Group's patients: every other patient on the server is left out.
    assert _decisions(tmp_path / "bulk") == want


def test_a_bulk_export_of_an_unknown_group_is_one_line_and_exit_1(tmp_path: Path) -> None:
    done = g0129("replay", "--bulk-export", HAPI, "--group", "no-such-group", "--out", str(tmp_path), env=BULK_ENV)
    assert done.returncode == 1
    assert done.stderr.startswith("g0129: bulk export kick-off refused: ") and "Group/no-such-group is not known" in done.stderr
    assert done.stderr.count("\n") == 1
