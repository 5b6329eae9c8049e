"""A biller at the review page, in a real browser: headless Chromium from Debian's packages
(`chromium`, `chromium-driver`), driven by Selenium through the system chromedriver (nothing is
downloaded), against a real `g0129 serve` beside HAPI (scripts/fhir-server up).

Sign in, see the review item, approve it, and find the Claim billed and the Task completed on
HAPI. The list page's screenshot is written as a test artifact (`G0129_TEST_ARTIFACTS`, default
`out/test-artifacts/`). `.ci/run` installs the browser; without it (or without HAPI) the test
skips, unless `G0129_E2E_REQUIRED=1`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT
from .test_e2e_hapi import (
    HAPI,
    OWNER,
    TASK_IDENTIFIER_SYSTEM,
    Adapter,
    claim,
    decision_of,
    fhir,
    g0129_lines,
    php_day,
    post_transaction,
    validation_errors,
    wait_annotated,
    wait_for,
    _hapi_up,
)

PASSWORD = "browser-test-secret"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("G0129_TEST_ARTIFACTS", ROOT / "out" / "test-artifacts"))
REQUIRED = os.environ.get("G0129_E2E_REQUIRED") == "1"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not REQUIRED and not _hapi_up(), reason=f"no FHIR server at {HAPI} (scripts/fhir-server up)"),
    pytest.mark.skipif(
        not REQUIRED and not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="no chromium / chromedriver (apt-get install chromium chromium-driver)",
    ),
]


def arrives(browser: Any, path: str) -> None:
    """Wait for the page a form posted to (the POST answers 303): a click returns before the
    browser has followed the redirect."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: b.current_url.endswith(path), f"never reached {path}")


@pytest.fixture(scope="module")
def page_adapter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Adapter]:
    team = {"resourceType": "Organization", "id": OWNER.split("/")[1], "active": True, "name": "Billing office (G0129 review)"}
    assert fhir.put(f"/{OWNER}", json=team).status_code in (200, 201)
    a = Adapter(tmp_path_factory.mktemp("page") / "data", HAPI)
    a.env["G0129_UI_PASSWORD"] = PASSWORD
    a.start()
    yield a
    a.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def test_a_biller_approves_a_review_item_in_the_browser(page_adapter: Adapter, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    def coverage_ended(r: dict[str, dict[str, Any]]) -> None:
        r["cov"]["period"] = {"start": "2024-01-01", "end": "2025-02-28"}  # before the session

    prefix, bundle = php_day(coverage_ended)
    post_transaction(bundle)
    # No Subscription here: the page's adapter is told by the sync the test asks for.
    assert page_adapter.notify(fhir.get(f"/Encounter/{prefix}-enc").json()).status_code == 200
    wait_annotated(prefix)

    browser.get(f"{page_adapter.url}/review")
    assert browser.current_url.endswith("/review/sign-in")
    browser.find_element(By.NAME, "name").send_keys("Dana Biller")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    arrives(browser, "/review")
    assert "Signed in as Dana Biller" in browser.page_source
    link = browser.find_element(By.LINK_TEXT, f"Claim/{prefix}-claim")
    row = link.find_element(By.XPATH, "./ancestor::tr")
    assert "COVERAGE" in row.text and "medicare" in row.text and "2025-03-04" in row.text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "review-list.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0

    link.click()
    assert f"Review Claim/{prefix}-claim" in browser.page_source
    browser.find_element(By.XPATH, "//button[@value='approve']").click()
    arrives(browser, "/review")

    c = wait_for("the approved Claim billed", lambda: (lambda c: c if g0129_lines(c) else None)(claim(prefix)), 60)
    assert decision_of(c, f"Encounter/{prefix}-enc")["outcome"] == "bill"
    task = fhir.get("/Task", params={"identifier": f"{TASK_IDENTIFIER_SYSTEM}|Claim/{prefix}-claim"}).json()["entry"][0]["resource"]
    assert task["status"] == "completed" and task["owner"] == {"display": "Dana Biller"}
    assert validation_errors(task) == [] and validation_errors(c) == []
    browser.get(f"{page_adapter.url}/review")
    assert f"Claim/{prefix}-claim" not in browser.page_source, "the answered item left the list"
