"""The review page through the sidecar's ASGI seam, the FHIR server in memory: off by default,
sign-in (password or a trusted proxy's header), the list with its filters, the detail page,
an answer written on the Task with a CSRF token, and the Claim decided again."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx

from adapter import jsonio
from adapter.vocabulary import TASK_CODE_SYSTEM

from .conftest import FIXTURES, serve
from .fakefhir import FakeFHIR

PASSWORD = "correct horse battery staple"


async def decided(fake: FakeFHIR, app: Any) -> tuple[str, dict[str, Any]]:
    """Fixture 53 (a Medicare Advantage plan: payer policy not on file) decided by the worker:
    its Claim under review, its Task on the server."""
    fake.load_file(FIXTURES / "53-medicare-advantage-php.json")
    [encounter] = [e["id"] for e in fake.all("Encounter")]
    await app.state.worker.sync([encounter])
    [task] = fake.all("Task")
    return encounter, task


async def sign_in(client: httpx.AsyncClient) -> None:
    page = await client.get("/review/sign-in")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf
    r = await client.post("/review/sign-in", data={"csrf": csrf[1], "name": "Dana Biller", "password": PASSWORD})
    assert r.status_code == 303 and r.headers["location"] == "/review"
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()


def test_the_page_is_off_unless_a_secret_or_a_proxy_header_is_set(tmp_path: Path, fake: FakeFHIR) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        for path in ("/review", "/review/sign-in", "/review/t1"):
            r = await client.get(path)
            assert r.status_code == 404 and "The review page is off" in r.text
        assert (await client.post("/review/t1", data={"answer": "approve"})).status_code == 404
        assert not [p for p in app.openapi()["paths"] if p.startswith("/review")], "a page for people, not the API"

    serve(tmp_path, test)


def test_a_biller_signs_in_finds_the_item_and_approves_it(tmp_path: Path, fake: FakeFHIR) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        encounter, task = await decided(fake, app)
        r = await client.get("/review")
        assert r.status_code == 303 and r.headers["location"] == "/review/sign-in"
        page = await client.get("/review/sign-in")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token
        wrong = await client.post("/review/sign-in", data={"csrf": token[1], "name": "Dana Biller", "password": "guess"})
        assert wrong.status_code == 401 and "Wrong password" in wrong.text
        forged = await client.post("/review/sign-in", data={"csrf": "x", "name": "Dana Biller", "password": PASSWORD})
        assert forged.status_code == 403
        await sign_in(client)

        listing = await client.get("/review")
        assert listing.status_code == 200 and "text/html" in listing.headers["content-type"]
        rows = re.findall(r'<tr class="item">(.*?)</tr>', listing.text, re.S)
        assert len(rows) == 1
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td>(.*?)</td>", rows[0], re.S)]
        assert cells == ["2025-04-08", "medicare-advantage (Aetna Health Inc.)", "PAYER", "", "Claim/php53-claim", "Patient/php53-pat"]
        assert "Signed in as Dana Biller" in listing.text
        for query, shown in (
            ({"payer": "medicare-advantage"}, 1), ({"payer": "medicare"}, 0), ({"rule": "PAYER"}, 1), ({"rule": "COVERAGE"}, 0),
            ({"date_from": "2025-04-08", "date_to": "2025-04-08"}, 1), ({"date_from": "2025-04-09"}, 0),
        ):
            filtered = await client.get("/review", params=query)
            assert len(re.findall(r'<tr class="item">', filtered.text)) == shown, query

        detail = await client.get(f"/review/{task['id']}")
        assert detail.status_code == 200 and ">Approve</button>" in detail.text and ">Reject</button>" in detail.text
        assert "G0129 x 1 on 2025-04-08, revenue code 0430" in detail.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', detail.text)
        assert csrf
        refused = await client.post(f"/review/{task['id']}", data={"answer": "approve", "version": "1", "csrf": "forged"})
        assert refused.status_code == 403 and fake.current("Task", task["id"])["status"] == "requested"
        stale = await client.post(f"/review/{task['id']}", data={"answer": "approve", "version": "0", "csrf": csrf[1]})
        assert stale.status_code == 409

        r = await client.post(f"/review/{task['id']}", data={"answer": "approve", "version": "1", "csrf": csrf[1]})
        assert r.status_code == 303 and r.headers["location"] == "/review"
        done = fake.current("Task", task["id"])
        assert done is not None and done["status"] == "completed" and done["owner"] == {"display": "Dana Biller"}
        assert done["output"][0]["valueCodeableConcept"] == {"coding": [{"system": TASK_CODE_SYSTEM, "code": "approve"}]}
        # The answer is queued: the worker decides the Claim again and bills it.
        assert await app.state.worker.run_once()
        claim = fake.current("Claim", "php53-claim")
        assert claim is not None and any(i.get("servicedDate") == "2025-04-08" for i in claim.get("item", []))
        assert {"display": "Dana Biller"} in [a["who"] for a in fake.all("Provenance")[-1]["agent"]]
        assert len(re.findall(r'<tr class="item">', (await client.get("/review")).text)) == 0

    serve(tmp_path, test, G0129_UI_PASSWORD=PASSWORD)


def test_behind_a_proxy_its_header_names_the_person(tmp_path: Path, fake: FakeFHIR) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        _, task = await decided(fake, app)
        assert (await client.get("/review")).status_code == 401
        who = {"X-Forwarded-User": "rivera"}
        assert (await client.get("/review", headers=who)).status_code == 200
        detail = await client.get(f"/review/{task['id']}", headers=who)
        csrf = re.search(r'name="csrf" value="([^"]+)"', detail.text)
        assert csrf
        other = await client.post(f"/review/{task['id']}", headers={"X-Forwarded-User": "someone-else"}, data={"answer": "reject", "version": "1", "csrf": csrf[1]})
        assert other.status_code == 403, "a token is bound to its person"
        r = await client.post(f"/review/{task['id']}", headers=who, data={"answer": "reject", "version": "1", "csrf": csrf[1]})
        assert r.status_code == 303
        assert fake.current("Task", task["id"])["owner"] == {"display": "rivera"}
        assert await app.state.worker.run_once()
        claim = fake.current("Claim", "php53-claim")
        assert claim is not None and '"do-not-bill"' in jsonio.dumps(claim).decode()

    serve(tmp_path, test, G0129_UI_USER_HEADER="X-Forwarded-User")


def test_what_the_server_holds_is_shown_as_text_never_as_markup(tmp_path: Path, fake: FakeFHIR) -> None:
    async def test(client: httpx.AsyncClient, app: Any) -> None:
        _, task = await decided(fake, app)
        hostile = jsonio.copy(task)
        hostile["input"].append({"type": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "missing-data"}]}, "valueString": "<script>alert(1)</script>"})
        fake.put(hostile)
        page = await client.get("/review", headers={"X-Forwarded-User": "<b>rivera</b>"})
        assert "<script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "<b>rivera</b>" not in page.text

    serve(tmp_path, test, G0129_UI_USER_HEADER="X-Forwarded-User")
