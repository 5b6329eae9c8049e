from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import orjson

from adapter.cli import main

from .conftest import FIXTURES, ROOT
from .factories import php_day

GOOD = FIXTURES / "01-medicare-php-hospital.json"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _bad_inputs(folder: Path) -> None:
    folder.mkdir()
    (folder / "truncated.json").write_bytes(GOOD.read_bytes()[:500])
    (folder / "notes.json").write_text('{"title": "shopping list"}')
    (folder / "r5-encounter.json").write_text('{"resourceType": "Encounter", "id": 7}')
    bad_line = orjson.dumps(php_day()["patient"]) + b"\n{broken\n"
    (folder / "export.ndjson").write_bytes(bad_line)


def test_replay_writes_the_three_files_and_a_summary(tmp_path: Path) -> None:
    code, out, err = run("replay", str(GOOD), "--out", str(tmp_path))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claims.ndjson", "decisions.ndjson", "errors.ndjson"]
    decision = orjson.loads((tmp_path / "decisions.ndjson").read_bytes())
    assert decision["encounter"] == "Encounter/php01-enc" and decision["outcome"] == "bill"
    assert "outcomes: bill 1, review 0, do-not-bill 0" in out
    assert "DAY-SERVICES    info 1" in out


def test_bad_inputs_among_good_ones_exit_1_and_good_ones_are_still_decided(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    _bad_inputs(bad)
    out_dir = tmp_path / "out"
    code, out, err = run("replay", str(GOOD), str(bad), "--out", str(out_dir))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert any("export.ndjson:2: malformed JSON" in line for line in lines)
    assert any("notes.json: no resourceType" in line for line in lines)
    assert any("truncated.json: malformed JSON" in line for line in lines)
    assert "Traceback" not in err
    decisions = (out_dir / "decisions.ndjson").read_bytes().splitlines()
    assert len(decisions) == 1
    errors = [orjson.loads(line) for line in (out_dir / "errors.ndjson").read_bytes().splitlines()]
    assert {e["error"] for e in errors} == {"InvalidJSON", "NotFHIR", "InvalidResource"}


def test_missing_path_is_an_input_error_not_a_crash(tmp_path: Path) -> None:
    code, _, err = run("replay", str(GOOD), str(tmp_path / "nope.json"), "--out", str(tmp_path / "o"))
    assert code == 1 and "nope.json" in err


def test_evaluate_prints_ndjson_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run("evaluate", str(GOOD))
    assert code == 0
    assert [orjson.loads(line)["outcome"] for line in out.splitlines()] == ["bill"]
    assert list(tmp_path.iterdir()) == []


def test_rules_lists_the_catalog_with_sources(ruleset) -> None:
    code, out, _ = run("rules")
    assert code == 0
    for rule in ruleset.rules:
        assert rule.id in out and rule.source in out
    code, out, _ = run("rules", "--json")
    catalog = orjson.loads(out)
    assert [r["id"] for r in catalog["rules"]] == [r.id for r in ruleset.rules]
    assert {r["status"] for r in catalog["rules"]} <= {"CONFIRMED", "UNCERTAIN"}


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("replay")[0] == 2
    assert run("frobnicate")[0] == 2
    code, _, err = run("--mappings", str(tmp_path), "rules")
    assert code == 2 and "mapping table not found" in err


def test_failed_run_keeps_the_previous_output(tmp_path: Path) -> None:
    assert run("replay", str(GOOD), "--out", str(tmp_path))[0] == 0
    before = (tmp_path / "decisions.ndjson").read_bytes()
    (tmp_path / "mappings").mkdir()
    assert run("--mappings", str(tmp_path / "mappings"), "replay", str(GOOD), "--out", str(tmp_path))[0] == 2
    assert (tmp_path / "decisions.ndjson").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["claims.ndjson", "decisions.ndjson", "errors.ndjson"]


def test_console_script_runs_as_a_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    _bad_inputs(bad)
    proc = subprocess.run(
        [sys.executable, "-m", "adapter.cli", "evaluate", str(GOOD), str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 1
    assert len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_a_closed_pipe_ends_quietly() -> None:
    proc = subprocess.run(
        # `true` exits at once: every write of ours meets a closed pipe.
        f"{sys.executable} -m adapter.cli evaluate {FIXTURES} | true", shell=True, capture_output=True, text=True, cwd=ROOT
    )
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
