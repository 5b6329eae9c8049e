"""The review Task: one per Claim under review, written with the Claim, cancelled once a later
decision no longer needs review, answered by a person. Golden Tasks beside the fixtures
(`*.expected.task.json`, made by `python3 -m tests.golden`); the worker against the in-memory
FHIR server; replay's review.csv."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from adapter import jsonio
from adapter.annotate import draft_claim_id
from adapter.fhir_client import FHIRClient
from adapter.fhir_models import validate
from adapter.metrics import Metrics
from adapter.queue import JobQueue
from adapter.retry import RetryPolicy
from adapter.review import REVIEW_COLUMNS, task_condition, task_key
from adapter.ruleset import RuleSet
from adapter.vocabulary import DECISION_EXTENSION, DRAFT_IDENTIFIER_SYSTEM, LINE_EXTENSION, TASK_CODE_SYSTEM, TASK_IDENTIFIER_SYSTEM
from adapter.worker import Worker

from .conftest import FIXTURES, SCENARIO_DIRS
from .fakefhir import FakeFHIR
from .golden import TASK_OWNER, task_path, tasks_by_fixture

BASE = "http://fhir.test/fhir"
SCENARIOS = sorted(p for d in SCENARIO_DIRS for p in d.iterdir() if p.suffix in (".json", ".ndjson") and ".expected." not in p.name)


@pytest.fixture(scope="module")
def made() -> dict[Path, list[dict[str, Any]]]:
    return tasks_by_fixture()


@pytest.mark.parametrize("fixture", SCENARIOS, ids=lambda p: p.name.split(".")[0])
def test_the_golden_task_file_is_what_the_code_makes(fixture: Path, made: dict[Path, list[dict[str, Any]]]) -> None:
    tasks = made.get(fixture.resolve())
    golden = task_path(fixture)
    if tasks is None:
        assert not golden.exists(), "no Claim of this scenario is under review: run python3 -m tests.golden"
        return
    bundle = jsonio.loads(golden.read_bytes())
    assert [e["resource"] for e in bundle["entry"]] == tasks, "run: python3 -m tests.golden and review the diff"
    for task in tasks:
        validate(task, str(golden))


def test_about_a_quarter_of_the_scenarios_ask_for_review(made: dict[Path, list[dict[str, Any]]]) -> None:
    assert len(made) >= 13
    assert all(t["status"] == "requested" and t["input"] and t["reasonCode"]["coding"] for ts in made.values() for t in ts)


def test_a_draft_keeps_its_task_identifier_once_the_server_names_it() -> None:
    draft = {"resourceType": "Claim", "identifier": [{"system": DRAFT_IDENTIFIER_SYSTEM, "value": "Encounter/e1"}]}
    assert task_key("Claim/1234", draft) == task_key(f"Claim/{draft_claim_id('Encounter/e1')}", draft) == "Claim/g0129-e1"
    assert task_key("Claim/c1", {"resourceType": "Claim"}) == "Claim/c1"
    assert task_condition("Claim/c1") == f"Task?identifier={TASK_IDENTIFIER_SYSTEM}|Claim/c1"


# -- through the worker ----------------------------------------------------------------------------


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture
def worker(tmp_path: Path, ruleset: RuleSet) -> Iterator[tuple[Worker, FakeFHIR]]:
    fake = FakeFHIR(BASE)
    queue = JobQueue(tmp_path / "queue.sqlite3")
    client = FHIRClient(BASE, retry=RetryPolicy(max_attempts=2), sleep=_no_sleep, transport=httpx.MockTransport(fake))
    yield Worker(queue, client, ruleset, Metrics(queue.counts), review_owner=TASK_OWNER), fake
    asyncio.run(client.aclose())
    queue.close()


def _transactions(fake: FakeFHIR) -> list[list[str]]:
    bodies = [jsonio.loads(r.content) for r in fake.requests if r.method == "POST" and r.content]
    return [[e["resource"]["resourceType"] for e in b["entry"]] for b in bodies if b.get("type") == "transaction"]


def test_a_claim_no_longer_under_review_has_its_task_cancelled(worker: tuple[Worker, FakeFHIR]) -> None:
    w, fake = worker
    fake.load_file(FIXTURES / "11-session-without-end.json")
    asyncio.run(w.sync(["php11-enc"]))
    [task] = fake.all("Task")
    assert task["status"] == "requested" and task["focus"] == {"reference": "Claim/php11-claim"}
    assert _transactions(fake) == [["Claim", "Task", "Provenance"]]

    # The therapist records the end of the session: the day is billed, nobody needs to look.
    session = jsonio.copy(fake.current("Procedure", "php11-ot1"))
    session["performedPeriod"]["end"] = "2025-02-11T09:50:00-05:00"
    fake.put(session)
    asyncio.run(w.sync(["php11-enc"]))
    [cancelled] = fake.all("Task")
    assert (cancelled["id"], cancelled["meta"]["versionId"]) == (task["id"], "2"), "the same Task, updated"
    assert cancelled["status"] == "cancelled"
    assert cancelled["statusReason"]["text"].startswith("A later decision no longer needs review: bill for Encounter/php11-enc")
    assert "input" not in cancelled and "reasonCode" not in cancelled
    assert cancelled["owner"] == {"reference": TASK_OWNER}
    validate(cancelled, "cancelled Task")
    assert _transactions(fake)[-1] == ["Claim", "Task", "Provenance"]

    # Nothing changes: nothing is written, the Task stays as it is.
    asyncio.run(w.sync(["php11-enc"]))
    assert len(_transactions(fake)) == 2 and len(fake.all("Task")) == 1


def test_a_claim_never_under_review_gets_no_task(worker: tuple[Worker, FakeFHIR]) -> None:
    w, fake = worker
    fake.load_file(FIXTURES / "01-medicare-php-hospital.json")
    asyncio.run(w.sync(["php01-enc"]))
    assert fake.all("Task") == [] and _transactions(fake) == [["Claim", "Provenance"]]


# -- a person's answer ---------------------------------------------------------------------------

BILLER = {"reference": "Practitioner/biller-1", "display": "Dana Biller"}


def _answer(fake: FakeFHIR, answer: str, when: str = "2026-01-05T10:00:00Z") -> dict[str, Any]:
    """The biller completes the Task on the server, as an EHR's worklist would."""
    [task] = fake.all("Task")
    done = jsonio.copy(task) | {
        "status": "completed",
        "owner": BILLER,
        "executionPeriod": {"end": when},
        "output": [
            {
                "type": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "answer"}]},
                "valueCodeableConcept": {"coding": [{"system": TASK_CODE_SYSTEM, "code": answer}]},
            }
        ],
    }
    return fake.put(done)


def _decision(claim: dict[str, Any]) -> dict[str, Any]:
    [ext] = [e for e in claim["extension"] if e["url"] == DECISION_EXTENSION]
    return {"outcome": next(p["valueCode"] for p in ext["extension"] if p["url"] == "outcome"),
            "rules": [p["valueCode"] for p in ext["extension"] if p["url"] == "rule"]}


def test_an_approved_review_bills_the_proposed_lines_and_says_who_approved(worker: tuple[Worker, FakeFHIR]) -> None:
    w, fake = worker
    fake.load_file(FIXTURES / "53-medicare-advantage-php.json")
    [encounter] = [e["id"] for e in fake.all("Encounter")]
    [result] = asyncio.run(w.sync([encounter]))
    assert result.decisions[0].outcome == "review" and result.decisions[0].lines
    proposed = result.decisions[0].lines
    answered = _answer(fake, "approve")

    [result] = asyncio.run(w.sync([encounter]))
    [decision] = result.decisions
    assert decision.outcome == "bill" and decision.lines == proposed
    [approval] = [f for f in decision.findings if f.rule == "REVIEW"]
    assert (approval.severity, approval.subject) == ("info", f"Task/{answered['id']}")
    assert approval.message == "Approved by Dana Biller on 2026-01-05T10:00:00Z (the questions of PAYER): the proposed lines are billed."
    assert [f.severity for f in decision.findings if f.rule == "PAYER"] == ["warning"], "the question stays, answered"
    claim = fake.current("Claim", result.claim.split("/")[1])
    assert claim is not None and _decision(claim)["outcome"] == "bill"
    assert [i["servicedDate"] for i in claim["item"] if any(e["url"] == LINE_EXTENSION for e in i.get("extension", []))] == [
        line.service_date for line in proposed
    ]
    # The Task stays as the biller left it; the Provenance names it and the biller.
    assert fake.current("Task", answered["id"]) == answered
    provenance = fake.all("Provenance")[-1]
    assert f"Task/{answered['id']}/_history/2" in [e["what"]["reference"] for e in provenance["entity"]]
    assert {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "verifier"}]}, "who": BILLER} in provenance["agent"]
    validate(provenance, "provenance")
    assert _transactions(fake)[-1] == ["Claim", "Provenance"]


def test_a_rejected_review_is_not_billed(worker: tuple[Worker, FakeFHIR]) -> None:
    w, fake = worker
    fake.load_file(FIXTURES / "53-medicare-advantage-php.json")
    [encounter] = [e["id"] for e in fake.all("Encounter")]
    asyncio.run(w.sync([encounter]))
    _answer(fake, "reject")
    [result] = asyncio.run(w.sync([encounter]))
    [decision] = result.decisions
    assert decision.outcome == "do-not-bill" and decision.lines == ()
    assert [(f.severity, f.message) for f in decision.findings if f.rule == "REVIEW"] == [
        ("error", "Rejected by Dana Biller on 2026-01-05T10:00:00Z: G0129 is not billed.")
    ]
    assert fake.all("Task")[0]["status"] == "completed"


def test_an_approval_answers_only_the_questions_its_task_asked(worker: tuple[Worker, FakeFHIR]) -> None:
    w, fake = worker
    fake.load_file(FIXTURES / "53-medicare-advantage-php.json")
    [encounter] = [e["id"] for e in fake.all("Encounter")]
    asyncio.run(w.sync([encounter]))
    answered = _answer(fake, "approve")
    # Then a session loses its end time: a question the biller was never asked.
    [session] = [p for p in fake.all("Procedure") if (p.get("performedPeriod") or {}).get("end")][:1]
    changed = jsonio.copy(session)
    del changed["performedPeriod"]["end"]
    fake.put(changed)
    [result] = asyncio.run(w.sync([encounter]))
    [decision] = result.decisions
    assert decision.outcome == "review"
    assert {f.rule for f in decision.findings if f.severity == "review"} == {"SESSION-TIMES"}
    # The Task asks again, the new question with the one answered (an approval covers only the
    # whole question it was given).
    [task] = fake.all("Task")
    assert task["id"] == answered["id"] and task["status"] == "requested"
    assert [c["code"] for c in task["reasonCode"]["coding"]] == ["SESSION-TIMES", "PAYER"]
    # The next decision no longer has the answer the Task carried (the Claim drops its REVIEW
    # finding); then it is stable.
    [again] = asyncio.run(w.sync([encounter]))
    assert again.result == "updated" and "REVIEW" not in _decision(fake.current("Claim", result.claim.split("/")[1]) or {})["rules"]
    assert fake.all("Task")[0]["reasonCode"] == task["reasonCode"]
    writes = len(_transactions(fake))
    [last] = asyncio.run(w.sync([encounter]))
    assert last.result == "unchanged" and len(_transactions(fake)) == writes


# -- review.csv ------------------------------------------------------------------------------------


def test_replay_writes_a_review_row_per_decision_under_review(tmp_path: Path) -> None:
    from adapter.cli import main

    assert main(["replay", str(FIXTURES), "--out", str(tmp_path)], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    decisions = [orjson.loads(line) for line in (tmp_path / "decisions.ndjson").read_bytes().splitlines()]
    text = (tmp_path / "review.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert text.splitlines()[0] == ",".join(REVIEW_COLUMNS)
    assert sorted(r["encounter"] for r in rows) == sorted(d["encounter"] for d in decisions if d["outcome"] == "review")
    assert [r["service_date"] for r in rows] == sorted(r["service_date"] for r in rows) and all(r["service_date"] for r in rows)
    assert next(r for r in rows if r["encounter"] == "Encounter/php53-enc") == {
        "service_date": "2025-04-08",
        "payer": "medicare-advantage",
        "payer_name": "Aetna Health Inc.",
        "program": "PHP",
        "rules": "PAYER",
        "missing_data": "",
        "proposed_units": "1",
        "claim": "Claim/php53-claim",
        "encounter": "Encounter/php53-enc",
        "patient": "Patient/php53-pat",
        "findings": "Medicare Advantage plan (policy not identified): payer policy data not available for G0129 in PHP.",
    }
    without_end = next(r for r in rows if r["encounter"] == "Encounter/php11-enc")
    assert (without_end["rules"], without_end["proposed_units"]) == ("SESSION-TIMES", "0")
    assert without_end["missing_data"] == "session_times:Procedure/php11-ot1; session_times"


def test_a_run_with_nothing_under_review_writes_the_header_alone(tmp_path: Path) -> None:
    from adapter.cli import main

    assert main(["replay", str(FIXTURES / "01-medicare-php-hospital.json"), "--out", str(tmp_path)], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    assert (tmp_path / "review.csv").read_bytes() == (",".join(REVIEW_COLUMNS) + "\r\n").encode()
