"""The images, run: the adapter image alone, beside the HAPI test image, and docker/compose.yaml.

`scripts/image build` builds the images with podman and `scripts/image test` runs this module
with G0129_IMAGE_TEST=1; without it the module is skipped (a plain `python3 -m pytest` needs no
container engine). The images, ports and compose project come from scripts/image's G0129_IMAGE_*
variables. Everything a test starts carries the label `g0129-image-test` and is removed by the
test, and by `scripts/image clean` if a test could not.

Two limits of podman 4.3 (Debian bookworm's) on a machine without systemd shape the compose test:
no timer runs the healthchecks, so the test runs each one with `podman healthcheck run` (the
check defined in the image or compose file, nothing of the test's own); and podman-compose ignores
`condition: service_healthy` before podman 4.6, so the test starts the services one by one in the
order their `depends_on` gives, each once the ones it depends on are healthy, as compose would.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from .conftest import FIXTURES, ROOT, annotated, php_day_transaction, wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("G0129_IMAGE_TEST") != "1", reason="the images are tested by `scripts/image test`"
)

ADAPTER_IMAGE = os.environ.get("G0129_IMAGE_ADAPTER", "localhost/g0129-adapter:ci")
HAPI_IMAGE = os.environ.get("G0129_IMAGE_HAPI", "localhost/g0129-hapi-test:ci")
ADAPTER_PORT = int(os.environ.get("G0129_IMAGE_ADAPTER_PORT", "18000"))
HAPI_PORT = int(os.environ.get("G0129_IMAGE_HAPI_PORT", "18080"))
PROJECT = os.environ.get("G0129_IMAGE_PROJECT", "g0129-image-test")
LABEL = "g0129-image-test"
TOKEN = "image-test-webhook-token"
COMPOSE_FILES = [ROOT / "docker" / "compose.yaml", ROOT / "docker" / "ci" / "compose.yaml"]
HAPI_START = 300.0  # seconds: HAPI starts in about a minute here, slower while the machine is busy
UID = "10001"


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"podman {shlex.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result


def inspect(kind: str, name: str) -> dict[str, Any]:
    (item,) = json.loads(podman(kind, "inspect", name).stdout)
    assert isinstance(item, dict)
    return item


def g0129_here(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The same command from this checkout, outside any container: what the image must match."""
    return subprocess.run(
        [sys.executable, "-m", "adapter.cli", "--no-progress", *args], capture_output=True, text=True, cwd=cwd, timeout=600,
    )


def wait_healthy(container: str, timeout: float) -> None:
    """Run the container's own healthcheck until it passes (no systemd timer runs it here)."""
    wait_for(
        f"{container} to be healthy",
        lambda: podman("healthcheck", "run", container, check=False).returncode == 0,
        timeout=timeout, every=3,
    )
    assert inspect("container", container)["State"]["Health"]["Status"] == "healthy"


def fhir_client(port: int) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}/fhir", timeout=30, headers={"Content-Type": "application/fhir+json"})


def load_php_day_and_wait(port: int) -> dict[str, Any]:
    """Load a PHP day (fixture 01 under fresh ids) into HAPI; return its Claim once annotated."""
    base = f"http://127.0.0.1:{port}/fhir"
    prefix, bundle = php_day_transaction(base)
    with fhir_client(port) as fhir:
        posted = fhir.post("", content=orjson.dumps(bundle))
        assert posted.status_code == 200, posted.text

        def annotated_claim() -> dict[str, Any] | None:
            got = fhir.get(f"/Claim/{prefix}-claim")
            assert got.status_code == 200, got.text
            c: dict[str, Any] = got.json()
            return c if annotated(c) else None

        claim: dict[str, Any] = wait_for(f"Claim/{prefix}-claim to be annotated", annotated_claim, timeout=120, every=1)
    return claim


def g0129_codes(claim: dict[str, Any]) -> list[str]:
    return [c["code"] for item in claim.get("item", []) for c in item["productOrService"]["coding"] if c.get("code") == "G0129"]


# -- the adapter image alone ----------------------------------------------------------------------


def test_runs_as_uid_10001() -> None:
    assert inspect("image", ADAPTER_IMAGE)["Config"]["User"] == f"{UID}:{UID}"
    ids = podman("run", "--rm", "--label", LABEL, ADAPTER_IMAGE, "sh", "-c", "id -u && id -g").stdout.split()
    assert ids == [UID, UID]


def test_version_is_the_checkouts() -> None:
    in_image = podman("run", "--rm", "--label", LABEL, "--read-only", ADAPTER_IMAGE, "g0129", "--version")
    here = g0129_here("--version")
    assert here.returncode == 0, here.stderr
    assert in_image.stdout == here.stdout
    assert in_image.stdout.startswith("g0129 ")


def test_replay_of_a_mounted_folder_matches_the_checkout(tmp_path: Path) -> None:
    """Read-only root, /data a volume, /tmp a tmpfs, fixtures/ mounted read-only; the packaged
    rule tables give the very bytes this checkout's replay gives."""
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, int(UID), int(UID))
    run = podman(
        "run", "--rm", "--label", LABEL, "--read-only", "--tmpfs", "/tmp", "-v", f"{data}:/data",
        "-v", f"{FIXTURES}:/fixtures:ro", ADAPTER_IMAGE, "g0129", "--no-progress", "replay", "/fixtures", "--out", "/data/out",
    )
    here = g0129_here("replay", str(FIXTURES), "--out", str(tmp_path / "here"))
    assert here.returncode == 0, here.stderr
    assert run.stdout.replace("/fixtures", str(FIXTURES)).replace("/data/out", str(tmp_path / "here")) == here.stdout
    for name in ("decisions.ndjson", "claims.ndjson", "errors.ndjson"):
        assert (data / "out" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name
    assert b'"code":"G0129"' in (data / "out" / "claims.ndjson").read_bytes()


# -- beside the HAPI test server ------------------------------------------------------------------


@dataclass
class Beside:
    network: str
    adapter: str
    subscribed: subprocess.CompletedProcess[str]


@pytest.fixture(scope="class")
def beside() -> Iterator[Beside]:
    """The adapter container (read-only, /data a volume) and the HAPI test container on one
    network, HAPI calling the adapter by its container name; torn down after the class."""
    run_id = uuid.uuid4().hex[:8]
    network, hapi, adapter, volume = (f"{LABEL}-{part}-{run_id}" for part in ("net", "hapi", "adapter", "data"))
    label = ("--label", LABEL)
    try:
        podman("network", "create", *label, network)
        podman("volume", "create", *label, volume)
        podman("run", "-d", *label, "--name", hapi, "--network", network, "-p", f"127.0.0.1:{HAPI_PORT}:8080", HAPI_IMAGE)
        env = ("-e", f"G0129_FHIR_BASE_URL=http://{hapi}:8080/fhir", "-e", f"G0129_WEBHOOK_TOKEN={TOKEN}")
        podman(
            "run", "-d", *label, "--name", adapter, "--network", network, "--read-only", "--tmpfs", "/tmp",
            "-v", f"{volume}:/data", "-p", f"127.0.0.1:{ADAPTER_PORT}:8000", *env, ADAPTER_IMAGE,
        )
        wait_healthy(hapi, HAPI_START)
        wait_healthy(adapter, 60)
        subscribed = podman(
            "run", "--rm", *label, "--network", network, *env, ADAPTER_IMAGE,
            "g0129", "subscribe", "--endpoint", f"http://{adapter}:8000/notify", "--wait", "120", check=False,
        )
        yield Beside(network, adapter, subscribed)
    finally:
        podman("rm", "-f", "-v", "--ignore", hapi, adapter, check=False)
        podman("volume", "rm", "-f", volume, check=False)
        podman("network", "rm", "-f", network, check=False)


class TestBesideHapi:
    def test_the_adapter_is_healthy_read_only(self, beside: Beside) -> None:
        # The fixture waited for the image's own HEALTHCHECK to pass: the Dockerfile's.
        check = inspect("image", ADAPTER_IMAGE)["Healthcheck"]["Test"]
        assert check[:3] == ["CMD", "python", "-c"] and "http://127.0.0.1:8000/healthz" in check[3]
        assert inspect("container", beside.adapter)["HostConfig"]["ReadonlyRootfs"] is True
        assert httpx.get(f"http://127.0.0.1:{ADAPTER_PORT}/healthz", timeout=5).json() == {"status": "alive"}

    def test_subscribe_exits_0(self, beside: Beside) -> None:
        assert beside.subscribed.returncode == 0, beside.subscribed.stdout + beside.subscribed.stderr

    def test_a_notification_ends_in_an_annotated_claim(self, beside: Beside) -> None:
        assert beside.subscribed.returncode == 0
        claim = load_php_day_and_wait(HAPI_PORT)
        assert g0129_codes(claim) == ["G0129"]
        # HAPI's rest-hook delivery reached the adapter (not only its periodic catch-up).
        logs = podman("logs", beside.adapter)
        assert f"/notify/Claim/{claim['id']}" in logs.stdout + logs.stderr


# -- docker/compose.yaml with podman-compose --------------------------------------------------------


def start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    """The services in an order that starts each after everything it depends on."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dependency in services[name].get("depends_on", {}):
                visit(dependency)
            order.append(name)

    for name in services:
        visit(name)
    return order


@dataclass
class Compose:
    containers: dict[str, str]
    exit_codes: dict[str, int]


@pytest.fixture(scope="class")
def compose() -> Iterator[Compose]:
    env = {
        **os.environ,
        "G0129_WEBHOOK_TOKEN": TOKEN,
        "HAPI_HOST_PORT": str(HAPI_PORT),
        "ADAPTER_HOST_PORT": str(ADAPTER_PORT),
    }
    command = ["podman-compose", "-p", PROJECT, *(a for f in COMPOSE_FILES for a in ("-f", str(f)))]

    def compose_run(*args: str) -> None:
        result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, f"podman-compose {' '.join(args)}:\n{result.stdout}\n{result.stderr}"

    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE_FILES[0].read_text(encoding="utf-8"))["services"]
    # What `up` runs with no --profile: the services that belong to no profile (PostgreSQL, for
    # replicas, is asked for with --profile postgres).
    services = {name: s for name, s in services.items() if not s.get("profiles")}
    containers: dict[str, str] = {}
    exit_codes: dict[str, int] = {}
    try:
        for name in start_order(services):
            compose_run("up", "-d", "--no-deps", name)
            (containers[name],) = podman(
                "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
                "--filter", f"label=com.docker.compose.service={name}",
            ).stdout.split()
            if services[name].get("healthcheck", {}).get("disable"):
                exit_codes[name] = int(podman("wait", containers[name], timeout=300).stdout.strip())
            else:
                wait_healthy(containers[name], HAPI_START)
        yield Compose(containers, exit_codes)
    finally:
        # -v: the anonymous volume the image's VOLUME gives `subscribe` too, which `down -v` keeps
        if containers:
            podman("rm", "-f", "-v", *containers.values(), check=False)
        subprocess.run([*command, "down", "-v"], capture_output=True, env=env, timeout=300)


class TestCompose:
    def test_every_service_is_healthy(self, compose: Compose) -> None:
        for name in ("hapi", "adapter"):
            assert inspect("container", compose.containers[name])["State"]["Health"]["Status"] == "healthy", name

    def test_the_local_images_run(self, compose: Compose) -> None:
        images = {name: inspect("container", cid)["ImageName"] for name, cid in compose.containers.items()}
        assert images == {"hapi": HAPI_IMAGE, "adapter": ADAPTER_IMAGE, "subscribe": ADAPTER_IMAGE}

    def test_subscribe_exits_0(self, compose: Compose) -> None:
        assert compose.exit_codes == {"subscribe": 0}, podman("logs", compose.containers["subscribe"]).stderr

    def test_a_php_day_loaded_into_hapi_comes_back_annotated(self, compose: Compose) -> None:
        claim = load_php_day_and_wait(HAPI_PORT)
        assert g0129_codes(claim) == ["G0129"]
