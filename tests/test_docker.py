"""docker/Dockerfile and docker/compose.yaml, checked without a Docker engine.

The files are parsed (PyYAML for compose, a small line parser for the Dockerfile) and checked
against the code they run: the `G0129_*` names must exist in adapter/settings.py, the commands
must parse with the real `g0129` argument parser, the routes they probe must exist in
adapter/service.py. `docker compose config` also runs when a compose v2 CLI is available.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapter.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"

SERVE_COMMAND = ["g0129", "serve", "--host", "0.0.0.0", "--port", "8000"]
NOTIFY_ENDPOINT = "http://adapter:8000/notify"


def _settings_names() -> set[str]:
    """Every G0129_* variable adapter/settings.py reads (by parsing it, not importing it)."""
    source = (ROOT / "adapter" / "settings.py").read_text(encoding="utf-8")
    return set(re.findall(r"""["'](G0129_[A-Z0-9_]+)["']""", source))


def _service_routes() -> set[tuple[str, str]]:
    source = (ROOT / "adapter" / "service.py").read_text(encoding="utf-8")
    return {(m.upper(), p) for m, p in re.findall(r"""@app\.(get|post|put)\(\s*["']([^"']+)["']""", source)}


# --- compose -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    return services


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the ["NAME=value", ...] form
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def test_compose_has_the_three_services_and_postgres_for_replicas(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"hapi", "adapter", "subscribe", "postgres"}
    assert services["postgres"]["profiles"] == ["postgres"], "PostgreSQL only when asked for: SQLite is the default"
    assert services["adapter"]["deploy"]["replicas"] == "${G0129_REPLICAS:-1}"
    assert _environment(services["adapter"])["G0129_DATABASE_URL"] == "${G0129_DATABASE_URL:-}"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    images = {name: s["image"] for name, s in services.items() if "image" in s}
    assert "hapi" in images
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image} is not pinned"
    # HAPI 8.8.x: the release hapi-server/ (our end-to-end server) is built on.
    hapi_version = re.search(r"<hapi\.version>([^<]+)</hapi\.version>", (ROOT / "hapi-server" / "pom.xml").read_text(encoding="utf-8"))
    assert hapi_version is not None
    assert images["hapi"].startswith(f"hapiproject/hapi:v{hapi_version.group(1)}-"), images["hapi"]


def test_hapi_is_r4_with_resthook_subscriptions(services: dict[str, dict[str, Any]]) -> None:
    hapi = services["hapi"]
    env = _environment(hapi)
    assert env["hapi.fhir.fhir_version"] == "R4"
    # The property is spelled with an underscore; a string, as compose requires.
    assert hapi["environment"]["hapi.fhir.subscription.resthook_enabled"] == "true"
    assert "-Xmx" in env["JAVA_TOOL_OPTIONS"]
    # 8080 on the host unless HAPI_HOST_PORT moves it (scripts/image test does)
    assert [str(p) for p in hapi["ports"]] == ["${HAPI_HOST_PORT:-8080}:8080"]


def test_every_long_running_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name in ("hapi", "adapter"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        assert not check.get("disable"), name
    # HAPI's image has no curl: the check must not rely on it.
    hapi_test = " ".join(services["hapi"]["healthcheck"]["test"])
    assert "curl" not in hapi_test and "wget" not in hapi_test
    assert "/fhir/metadata" in hapi_test or "/actuator/health" in hapi_test
    assert "/healthz" in " ".join(services["adapter"]["healthcheck"]["test"])


def test_startup_order(services: dict[str, dict[str, Any]]) -> None:
    assert services["adapter"]["depends_on"] == {"hapi": {"condition": "service_healthy"}}
    assert services["subscribe"]["depends_on"] == {
        "hapi": {"condition": "service_healthy"},
        "adapter": {"condition": "service_healthy"},
    }


def test_adapter_and_subscribe_build_the_repo_image(services: dict[str, dict[str, Any]]) -> None:
    for name in ("adapter", "subscribe"):
        build = services[name]["build"]
        assert (COMPOSE_FILE.parent / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE, name


def test_adapter_service(services: dict[str, dict[str, Any]], compose: dict[str, Any]) -> None:
    adapter = services["adapter"]
    env = _environment(adapter)
    assert env["G0129_FHIR_BASE_URL"] == "http://hapi:8080/fhir"
    assert env["G0129_WEBHOOK_TOKEN"].startswith("${G0129_WEBHOOK_TOKEN")
    assert env["G0129_DATA_DIR"] == "/data"
    volumes = [str(v) for v in adapter["volumes"]]
    named = [v.split(":", 1)[0] for v in volumes if v.endswith(":/data")]
    assert named and named[0] in compose["volumes"], volumes
    assert [str(p) for p in adapter["ports"]] == ["${ADAPTER_HOST_PORT:-8000}:8000"]
    assert adapter["restart"] == "unless-stopped"
    assert _command(adapter) == SERVE_COMMAND


def test_subscribe_is_one_shot_and_targets_the_adapter_by_service_name(services: dict[str, dict[str, Any]]) -> None:
    subscribe = services["subscribe"]
    assert subscribe["restart"] == "no"
    assert "ports" not in subscribe
    command = _command(subscribe)
    assert command[:2] == ["g0129", "subscribe"]
    args = _parser().parse_args(command[1:])
    assert args.endpoint == NOTIFY_ENDPOINT
    assert args.wait > 0
    env = _environment(subscribe)
    assert env["G0129_FHIR_BASE_URL"] == "http://hapi:8080/fhir"
    assert env["G0129_WEBHOOK_TOKEN"] == _environment(services["adapter"])["G0129_WEBHOOK_TOKEN"]


def test_commands_parse_with_the_real_cli(services: dict[str, dict[str, Any]]) -> None:
    serve = _parser().parse_args(_command(services["adapter"])[1:])
    assert (serve.command, serve.host, serve.port) == ("serve", "0.0.0.0", 8000)


def test_probed_routes_exist() -> None:
    routes = _service_routes()
    assert ("GET", "/healthz") in routes
    assert ("POST", "/notify") in routes


def test_the_ci_override_only_names_local_images(services: dict[str, dict[str, Any]]) -> None:
    """docker/ci/compose.yaml (scripts/image test) changes nothing but the images."""
    override = yaml.safe_load((DOCKER / "ci" / "compose.yaml").read_text(encoding="utf-8"))["services"]
    assert set(override) <= set(services)
    for name, service in override.items():
        assert set(service) == {"image"}, name
        assert service["image"].startswith("${G0129_IMAGE_"), name
        assert ":-localhost/" in service["image"], name


def test_compose_environment_names_are_settings(services: dict[str, dict[str, Any]]) -> None:
    known = _settings_names()
    assert "G0129_FHIR_BASE_URL" in known  # the parse itself works
    for name, service in services.items():
        for variable in _environment(service):
            if variable.startswith("G0129_"):
                assert variable in known, f"{name}: {variable} is not read by adapter/settings.py"


# --- Dockerfile ----------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comments inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return result


def _env_pairs(arguments: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shlex.split(arguments))


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text(encoding="utf-8"))


def _all(dockerfile: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in dockerfile if kw == keyword]


def test_dockerfile_parser_handles_continuations() -> None:
    parsed = _instructions('# c\nFROM x\nRUN a \\\n    # note\n    && b\nCMD ["y"]\n')
    assert parsed == [("FROM", "x"), ("RUN", "a  && b"), ("CMD", '["y"]')]


def _stages(dockerfile: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each stage (each FROM starts one)."""
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile:
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def test_base_image_is_a_build_argument_defaulting_to_slim_python_311(dockerfile: list[tuple[str, str]]) -> None:
    (default,) = [a.split("=", 1)[1] for a in _all(dockerfile, "ARG") if a.startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-[a-z]+)?", default), default
    assert dockerfile[0] == ("ARG", f"BASE_IMAGE={default}"), "declared before the first FROM"
    assert [a.split()[0] for a in _all(dockerfile, "FROM")] == ["${BASE_IMAGE}", "${BASE_IMAGE}"]


def test_wheels_are_built_in_the_first_stage_and_only_the_runtime_is_in_the_last(dockerfile: list[tuple[str, str]]) -> None:
    build, runtime = _stages(dockerfile)
    assert build[0][1].split()[-2:] == ["AS", "build"]
    build_runs = " ".join(a for kw, a in build if kw == "RUN")
    assert re.search(r"pip wheel .*--wheel-dir /wheels \.", build_runs), build_runs
    assert "--no-index --find-links /wheels g0129-adapter" in build_runs
    assert "pip uninstall --yes pip setuptools" in build_runs
    # the adapter's wheel is compiled with mypyc (setup.py): a C compiler here, none at run time
    assert re.search(r"\bgcc\b", build_runs), build_runs
    # the last stage copies the environment made from the wheels, and no source or wheel
    assert [a for kw, a in runtime if kw == "COPY"] == ["--from=build /opt/venv /opt/venv"]
    runtime_runs = " ".join(a for kw, a in runtime if kw == "RUN")
    assert "pip" not in runtime_runs and "python3-venv" not in runtime_runs and "gcc" not in runtime_runs
    env: dict[str, str] = {}
    for kw, arguments in runtime:
        if kw == "ENV":
            env.update(_env_pairs(arguments))
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_runs_as_a_fixed_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    users = _all(dockerfile, "USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit() and int(user) >= 1000, "a fixed numeric uid"
    # the last instruction that matters at run time runs as that user
    assert [kw for kw, _ in dockerfile].index("USER") < [kw for kw, _ in dockerfile].index("CMD")


def test_environment_uses_the_packaged_tables_and_the_volume(dockerfile: list[tuple[str, str]]) -> None:
    env: dict[str, str] = {}
    for arguments in _all(dockerfile, "ENV"):
        env.update(_env_pairs(arguments))
    known = _settings_names()
    for name in env:
        if name.startswith("G0129_"):
            assert name in known, f"{name} is not read by adapter/settings.py"
    assert "G0129_MAPPINGS_DIR" not in env, "the rule tables come inside the package"
    assert env["G0129_DATA_DIR"] == "/data"
    volumes = [v for a in _all(dockerfile, "VOLUME") for v in (json.loads(a) if a.startswith("[") else a.split())]
    assert "/data" in volumes


def test_installs_the_package_non_editable(dockerfile: list[tuple[str, str]]) -> None:
    runs = " ".join(_all(dockerfile, "RUN"))
    assert "-e ." not in runs and "--editable" not in runs


def test_every_copy_source_exists(dockerfile: list[tuple[str, str]]) -> None:
    copies = _all(dockerfile, "COPY")
    assert copies
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    copies = [a for a in copies if not a.startswith("--from=")]  # from a stage, not the context
    for arguments in copies:
        parts = [p for p in shlex.split(arguments) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"
    sources = {p.rstrip("/") for a in copies for p in shlex.split(a)[:-1]}
    assert {"pyproject.toml", "setup.py", "README.md", "adapter"} <= sources


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".git", "out/", "data/", "hapi-server/target/", ".fhir-server/"} <= ignored


def test_exposes_and_serves_on_8000(dockerfile: list[tuple[str, str]]) -> None:
    assert _all(dockerfile, "EXPOSE") == ["8000"]
    (cmd,) = _all(dockerfile, "CMD")
    assert json.loads(cmd) == SERVE_COMMAND


def test_healthcheck_asks_healthz_without_curl(dockerfile: list[tuple[str, str]]) -> None:
    (check,) = _all(dockerfile, "HEALTHCHECK")
    assert "CMD" in check and "/healthz" in check and ":8000" in check
    assert "curl" not in check and "urllib" in check
    # the embedded Python is valid
    exec_form = json.loads(check[check.index("CMD") + 3 :].strip())
    assert exec_form[:2] == ["python", "-c"]
    compile(exec_form[2], "<healthcheck>", "exec")


# --- docker compose config (only with a compose v2 CLI; no engine needed) ----------------


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [docker, "compose"] if probe.returncode == 0 else None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` CLI here")
    env = {**os.environ, "G0129_WEBHOOK_TOKEN": "test-token"}
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["services"]["adapter"]["environment"]["G0129_WEBHOOK_TOKEN"] == "test-token"
    # without a token the file refuses to start anything
    env.pop("G0129_WEBHOOK_TOKEN")
    refused = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
    )
    assert refused.returncode != 0
    assert "G0129_WEBHOOK_TOKEN" in refused.stderr
