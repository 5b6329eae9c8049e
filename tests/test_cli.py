from __future__ import annotations

import argparse
import importlib.metadata
import io
import re
import shutil
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import tqdm  # type: ignore[import-untyped, unused-ignore]

import adapter.cli
import adapter.replay
from adapter.cli import _parser, main
from adapter.ingest import load_bytes, load_paths
from adapter.pipeline import evaluate
from adapter.ruleset import DEFAULT_MAPPINGS_DIR, load_ruleset

from .conftest import FIXTURES, ROOT
from .factories import index_of, php_day

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


def test_replay_writes_the_four_files_and_a_summary(tmp_path: Path) -> None:
    code, out, err = run("replay", str(GOOD), "--out", str(tmp_path))
    assert code == 0, err
    # Beside the outputs only the hidden lock of the directory (`.g0129-lock`).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".g0129-lock", "claims.ndjson", "decisions.ndjson", "errors.ndjson", "review.csv"]
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


def test_a_missing_path_is_one_usage_line_before_any_work(tmp_path: Path) -> None:
    code, out, err = run("replay", str(GOOD), str(tmp_path / "nope.json"), "--out", str(tmp_path / "o"))
    assert (code, out) == (2, "")
    assert err == f"g0129: no such file or directory: {tmp_path / 'nope.json'}\n"
    assert not (tmp_path / "o").exists(), "nothing was written"
    assert run("evaluate", str(tmp_path / "nope.json"))[0] == 2


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


def _broken_tables(folder: Path) -> Path:
    folder.mkdir()
    (folder / "rules.yaml").write_text("rules: [\n")  # not YAML
    return folder


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("replay")[0] == 2
    assert run("frobnicate")[0] == 2
    code, out, err = run()
    assert (code, out) == (2, "") and "say which command" in err
    code, _, err = run("--mappings", str(tmp_path), "rules")
    assert code == 2 and "no rule tables found" in err
    code, _, err = run("--mappings", str(_broken_tables(tmp_path / "broken")), "rules")
    assert code == 2 and err.startswith("g0129: ") and "rules.yaml" in err
    code, _, err = run("--mappings", str(tmp_path / "nowhere"), "rules")
    assert code == 2 and "nowhere" in err


def test_failed_run_keeps_the_previous_output(tmp_path: Path) -> None:
    assert run("replay", str(GOOD), "--out", str(tmp_path))[0] == 0
    before = (tmp_path / "decisions.ndjson").read_bytes()
    broken = _broken_tables(tmp_path / "mappings")
    assert run("--mappings", str(broken), "replay", str(GOOD), "--out", str(tmp_path))[0] == 2
    assert (tmp_path / "decisions.ndjson").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file() and not p.name.startswith(".")) == ["claims.ndjson", "decisions.ndjson", "errors.ndjson", "review.csv"]
    assert not list(tmp_path.glob(".g0129-run-*")), "no run directory left behind"


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


# -- g0129 --version --------------------------------------------------------------------------


def _site_copy(folder: Path) -> Path:
    """A full copy of the bundled tables with one fact changed (so its ruleset version differs)."""
    shutil.copytree(DEFAULT_MAPPINGS_DIR, folder)
    site = folder / "site.yaml"
    site.write_text(site.read_text().replace("time_zone: null", "time_zone: America/Chicago", 1))
    return folder


def test_version_names_the_package_and_the_ruleset_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ruleset) -> None:
    package = importlib.metadata.version("g0129-adapter")
    assert run("--version") == (0, f"g0129 {package} (ruleset {ruleset.version})\n", "")
    site = _site_copy(tmp_path / "site")
    site_version = load_ruleset(site).version
    assert site_version != ruleset.version
    assert run("--mappings", str(site), "--version")[1] == f"g0129 {package} (ruleset {site_version})\n"
    monkeypatch.setenv("G0129_MAPPINGS_DIR", str(site))
    assert run("--version")[1] == f"g0129 {package} (ruleset {site_version})\n"


def test_version_with_unusable_tables_still_names_the_package(tmp_path: Path) -> None:
    code, out, err = run("--mappings", str(_broken_tables(tmp_path / "broken")), "--version")
    assert code == 2
    assert out == f"g0129 {importlib.metadata.version('g0129-adapter')} (ruleset not loaded)\n"
    assert err.startswith("g0129: ")


# -- global options, before or after the command ------------------------------------------------


def test_mappings_is_taken_before_or_after_the_command(tmp_path: Path) -> None:
    site = _site_copy(tmp_path / "site")
    version = load_ruleset(site).version
    for argv in (["--mappings", str(site), "rules", "--json"], ["rules", "--json", "--mappings", str(site)]):
        code, out, _ = run(*argv)
        assert code == 0 and orjson.loads(out)["ruleset_version"] == version, argv
    broken = str(_broken_tables(tmp_path / "broken"))
    for argv in (
        ["--mappings", broken, "replay", str(GOOD), "--out", str(tmp_path / "o")],
        ["replay", str(GOOD), "--out", str(tmp_path / "o"), "--mappings", broken],
        ["evaluate", "--mappings", broken, str(GOOD)],
    ):
        code, out, err = run(*argv)
        assert code == 2 and "rules.yaml" in err, argv
    # Given after the command, it wins over the one given before; left out after, the one
    # before stands.
    assert run("--mappings", broken, "rules", "--mappings", str(site))[0] == 0
    assert run("--mappings", broken, "rules")[0] == 2


def test_parser_reads_global_options_in_every_subcommand() -> None:
    parser = _parser()
    for argv in (["queue", "list", "--mappings", "D"], ["rules", "check", "--mappings", "D"], ["serve", "--mappings", "D"]):
        assert parser.parse_args(argv).mappings == Path("D"), argv
    assert parser.parse_args(["replay", "x"]).mappings is None
    assert parser.parse_args(["replay", "x", "--no-progress"]).progress is False
    assert parser.parse_args(["--no-progress", "replay", "x"]).progress is False
    assert parser.parse_args(["replay", "x"]).progress is True


# -- help ---------------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_parsers(sub))
    return found


def test_every_option_and_command_has_help() -> None:
    for parser in _parsers(_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(choice.help for choice in action._choices_actions), parser.prog
                assert set(action.choices) == {choice.dest for choice in action._choices_actions}, parser.prog
            else:
                assert action.help, f"{parser.prog} {action.option_strings or action.dest}"


def test_help_ends_with_the_exit_codes_and_the_settings() -> None:
    code, out, err = run("--help")
    assert (code, err) == (0, "")
    epilog = out[out.index("exit codes:"):]
    assert out.rstrip().endswith(epilog.rstrip()) and out.index("exit codes:") > out.index("--version")
    for exit_code in ("0", "1", "2", "130"):
        assert re.search(rf"^  {exit_code} +\S", epilog, re.MULTILINE), exit_code
    assert '"Settings" in the README' in epilog
    source = (ROOT / "adapter" / "settings.py").read_text()
    variables = set(re.findall(r'"(G0129_[A-Z_]+)"', source))
    assert len(variables) >= 19
    assert set(re.findall(r"G0129_[A-Z_]+", epilog)) == variables
    assert "G0129_" in (ROOT / "README.md").read_text()


def test_subcommand_help_goes_to_stdout() -> None:
    code, out, _ = run("rules", "--help")
    assert code == 0 and "check [DIR] | diff DIR" in out


# -- progress -----------------------------------------------------------------------------------


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_ndjson_reading_reports_bytes_as_lines_go_by() -> None:
    line = orjson.dumps(php_day()["patient"]) + b"\n"
    data = b"\xef\xbb\xbf" + line * 10_000 + b"\n{broken\n"
    reported: list[int] = []
    entries, errors = load_bytes(data, "big.ndjson", ndjson=True, on_bytes=reported.append)
    assert len(entries) == 10_000 and len(errors) == 1
    assert sum(reported) == len(data)
    assert len(reported) >= len(data) // (1 << 16), "the count moves inside one file"
    reported.clear()
    load_bytes(GOOD.read_bytes(), "one.json", on_bytes=reported.append)
    assert reported == [GOOD.stat().st_size]
    reported.clear()
    load_bytes(b"{truncated", "bad.json", on_bytes=reported.append)
    assert reported == [10]


def test_load_paths_reports_every_byte_it_reads(tmp_path: Path) -> None:
    reported: list[int] = []
    _, _, files = load_paths([FIXTURES], on_bytes=reported.append)
    inputs = [p for p in FIXTURES.iterdir() if p.suffix in (".json", ".ndjson") and ".expected." not in p.name]
    assert files == len(inputs)
    assert sum(reported) == sum(p.stat().st_size for p in inputs)


def _replay_with(stderr: io.StringIO, *argv: str, out_dir: Path) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["replay", str(GOOD), "--out", str(out_dir), *argv], stdout=out, stderr=stderr)
    return code, out.getvalue()


def test_progress_bars_show_on_a_terminal_only(tmp_path: Path) -> None:
    terminal = Terminal()
    code, out = _replay_with(terminal, out_dir=tmp_path / "a")
    assert code == 0
    shown = terminal.getvalue()
    for stage, unit in (("reading", "B"), ("deciding", "encounter")):
        assert re.search(rf"{stage}: .*/s\]", shown) and f"{unit}/s" in shown, stage
    assert shown.endswith("\r"), "the last bar is cleared from the line"
    assert "reading" not in out, "never on stdout"
    pipe = io.StringIO()
    code, piped_out = _replay_with(pipe, out_dir=tmp_path / "b")
    assert (code, pipe.getvalue()) == (0, "")
    assert piped_out == out.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    quiet = Terminal()
    assert _replay_with(quiet, "--no-progress", out_dir=tmp_path / "c")[0] == 0
    assert quiet.getvalue() == ""


def test_progress_bars_count_to_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[tuple[str, int, int]] = []

    class Recording(tqdm.tqdm):
        def close(self) -> None:
            if not self.disable:
                closed.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recording)  # the progress display imports it when it draws
    export = tmp_path / "in" / "export.ndjson"
    export.parent.mkdir()
    resources = php_day()
    export.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources.values()))
    code = main(["evaluate", str(export.parent)], stdout=io.StringIO(), stderr=Terminal())
    assert code == 0
    assert closed == [("reading", export.stat().st_size, export.stat().st_size), ("deciding", 1, 1)]


# -- the summary --------------------------------------------------------------------------------


def test_summary_counts_encounters_seen_in_scope_and_decided(tmp_path: Path) -> None:
    resources = php_day()
    resources["other"] = {
        "resourceType": "Encounter", "id": "e-other", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "Patient/p1"},
    }
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "export.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources.values()))
    code, out, err = run("replay", str(tmp_path / "in"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "  encounters: 2 seen, 1 in scope and decided (an OT session or a PHP/IOP program), 1 out of scope\n" in out
    assert "  claims: 1 annotated\n" in out


def test_run_result_counts_the_encounters_seen(ruleset) -> None:
    resources = php_day()
    resources["other"] = {"resourceType": "Encounter", "id": "e-other", "status": "finished",
                          "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}}
    index = index_of(resources)
    assert evaluate(index, ruleset).encounters_seen == 2
    assert evaluate(index, ruleset, encounters=["Encounter/e-other"]).encounters_seen == 1
    assert evaluate(index, ruleset, encounters=[]).encounters_seen == 0


# -- empty input --------------------------------------------------------------------------------


def test_a_directory_without_input_is_said_out_loud(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("not input")
    (empty / "01-x.expected.json").write_text("{}")
    for command in ("replay", "evaluate"):
        code, out, err = run(command, str(empty), "--out", str(tmp_path / "o")) if command == "replay" else run(command, str(empty))
        assert (code, out) == (2, "")
        assert err == f"g0129: no FHIR input found in {empty} (looked for *.json, *.ndjson, *.jsonl)\n"
    assert not (tmp_path / "o").exists()


def test_inputs_without_resources_are_said_out_loud(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "empty.ndjson").write_bytes(b"\n\n")
    (folder / "bundle.json").write_text('{"resourceType": "Bundle", "type": "collection"}')
    code, out, err = run("replay", str(folder), "--out", str(tmp_path / "o"))
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith(f"g0129: no FHIR resources in {folder} (2 file(s) read")
    assert not list((tmp_path / "o").glob("*.ndjson")), "nothing written"


def test_an_empty_directory_beside_input_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, out, err = run("replay", str(GOOD), str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 0 and "1 in scope" in out
    assert err == f"g0129: warning: no FHIR input found in {tmp_path / 'empty'} (looked for *.json, *.ndjson, *.jsonl)\n"


# -- arguments checked before any work ----------------------------------------------------------


@pytest.fixture
def no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an input was read")

    monkeypatch.setattr(adapter.replay, "plan", fail)  # the routing pass, which reads every input


def test_dry_run_without_a_server_is_refused_before_reading(tmp_path: Path, no_reading: None) -> None:
    code, out, err = run("replay", str(GOOD), "--out", str(tmp_path / "o"), "--dry-run")
    assert (code, out) == (2, "")
    assert err == "g0129: --dry-run needs --fhir-base: it shows what would be written to that server\n"
    assert not (tmp_path / "o").exists()
    code, _, err = run("replay", str(GOOD), "--out", str(tmp_path / "o"), "--fhir-base", "fhir.example.org")
    assert code == 2 and "--fhir-base must be an http(s) URL" in err


def test_an_out_that_is_no_directory_is_refused_before_reading(tmp_path: Path, no_reading: None) -> None:
    a_file = tmp_path / "decisions.txt"
    a_file.write_text("keep me")
    code, out, err = run("replay", str(GOOD), "--out", str(a_file))
    assert (code, out, err) == (2, "", f"g0129: --out {a_file}: exists and is not a directory\n")
    code, _, err = run("replay", str(GOOD), "--out", str(a_file / "sub"))
    assert code == 2 and err.startswith(f"g0129: --out {a_file / 'sub'}: cannot be created")
    assert a_file.read_text() == "keep me"


def test_an_out_that_cannot_be_written_is_refused_before_reading(
    tmp_path: Path, no_reading: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(adapter.cli.tempfile, "TemporaryFile", refuse)
    code, _, err = run("replay", str(GOOD), "--out", str(tmp_path / "o"))
    assert (code, err) == (2, f"g0129: --out {tmp_path / 'o'}: cannot write there (Permission denied)\n")


# -- rules check / rules diff -------------------------------------------------------------------


def test_rules_check_and_diff_are_wired_to_the_table_functions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ruleset
) -> None:
    seen: list[tuple[str, Path]] = []

    def check_tables(directory: Path) -> list[str]:
        seen.append(("check", directory))
        return ["bad/rules.yaml: rules[2].id: unknown rule 'X'", "bad/site.yaml: time_zone: not a zone"] if directory.name == "bad" else []

    def diff_tables(site: Path, default: Path = DEFAULT_MAPPINGS_DIR) -> list[str]:
        seen.append(("diff", site))
        return ["rule PROGRAM review: severity review -> error"] if site.name == "changed" else []

    monkeypatch.setattr(adapter.cli, "check_tables", check_tables)
    monkeypatch.setattr(adapter.cli, "diff_tables", diff_tables)
    bad, changed, same = tmp_path / "bad", tmp_path / "changed", DEFAULT_MAPPINGS_DIR
    assert run("rules", "check") == (0, f"{same}: the rule tables are valid (ruleset {ruleset.version})\n", "")
    assert run("rules", "check", str(bad)) == (
        2, "", "bad/rules.yaml: rules[2].id: unknown rule 'X'\nbad/site.yaml: time_zone: not a zone\n"
    )
    assert run("--mappings", str(bad), "rules", "check")[0] == 2, "default: the tables in use"
    assert run("rules", "diff", str(bad))[0] == 2
    assert run("rules", "diff", str(changed)) == (0, "rule PROGRAM review: severity review -> error\n", "")
    assert run("rules", "diff", str(same)) == (0, "no change against the bundled tables\n", "")
    assert ("diff", bad) not in seen, "invalid tables are not diffed"


def test_rules_check_and_diff_do_not_need_the_tables_in_use_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapter.cli, "check_tables", lambda directory: [])
    monkeypatch.setattr(adapter.cli, "diff_tables", lambda site, default=DEFAULT_MAPPINGS_DIR: [])
    broken = str(_broken_tables(tmp_path / "broken"))
    monkeypatch.setenv("G0129_MAPPINGS_DIR", broken)
    assert run("rules")[0] == 2, "the catalog does need them"
    assert run("rules", "check", str(DEFAULT_MAPPINGS_DIR))[0] == 0
    assert run("--mappings", broken, "rules", "diff", str(DEFAULT_MAPPINGS_DIR))[0] == 0


def test_rules_check_and_diff_on_real_tables(tmp_path: Path, ruleset) -> None:
    assert run("rules", "check") == (0, f"{DEFAULT_MAPPINGS_DIR}: the rule tables are valid (ruleset {ruleset.version})\n", "")
    broken = _broken_tables(tmp_path / "broken")
    code, out, err = run("rules", "check", str(broken))
    assert (code, out) == (2, "") and "rules.yaml" in err and "Traceback" not in err
    assert run("rules", "diff", str(broken))[0] == 2
    assert run("rules", "diff", str(DEFAULT_MAPPINGS_DIR)) == (0, "no change against the bundled tables\n", "")
    code, out, _ = run("rules", "diff", str(_site_copy(tmp_path / "site")))
    assert code == 0 and "time_zone" in out and "America/Chicago" in out


# -- replay cannot be stalled or blown up by one input ---------------------------------------------

def test_a_fifo_or_a_device_among_the_inputs_is_refused_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "day.json").write_bytes(GOOD.read_bytes())
    os.mkfifo(folder / "pipe.json")  # reading it would wait forever
    (folder / "zero.ndjson").symlink_to("/dev/zero")  # reading it would never end
    code, out, err = run("replay", str(folder), "--out", str(tmp_path / "out"))
    assert code == 1
    assert err.count("not a regular file") == 2
    assert '"outcome":"bill"' in (tmp_path / "out" / "decisions.ndjson").read_text()


def test_a_file_over_the_size_limit_is_an_input_error(tmp_path: Path) -> None:
    code, _, err = run("replay", str(GOOD), "--max-file-bytes", "1k", "--out", str(tmp_path))
    assert code in (1, 2) and "over the limit of 1024" in err
    assert run("replay", str(GOOD), "--max-file-bytes", "lots", "--out", str(tmp_path))[0] == 2


def test_a_huge_ndjson_line_is_skipped_and_the_rest_read(tmp_path: Path) -> None:
    bundle = orjson.loads(GOOD.read_bytes())
    lines = [orjson.dumps(e["resource"]) for e in bundle["entry"]]
    lines.insert(2, b'{"resourceType": "Basic", "id": "big", "note": "' + b"x" * 5000 + b'"}')
    export = tmp_path / "export.ndjson"
    export.write_bytes(b"\n".join(lines) + b"\n")
    code, _, err = run("replay", str(export), "--max-file-bytes", "4k", "--out", str(tmp_path / "out"))
    assert code == 1 and f"{export}:3: a line of" in err
    assert '"outcome":"bill"' in (tmp_path / "out" / "decisions.ndjson").read_text()


def test_a_killed_run_is_cleaned_up_or_completed_by_the_next(tmp_path: Path) -> None:
    from adapter.sinks import JOURNAL, RUN_PREFIX

    assert run("replay", str(GOOD), "--out", str(tmp_path))[0] == 0
    first = (tmp_path / "decisions.ndjson").read_bytes()
    # Killed while writing: a run directory and nothing else.
    (tmp_path / f"{RUN_PREFIX}dead").mkdir()
    (tmp_path / f"{RUN_PREFIX}dead" / "decisions.ndjson").write_bytes(b"half")
    # Killed while swapping in: the journal names a complete run; one file is already moved.
    done = tmp_path / f"{RUN_PREFIX}done"
    done.mkdir()
    (done / "claims.ndjson").write_bytes(b"claims of the killed run\n")
    (done / "errors.ndjson").write_bytes(b"")
    (tmp_path / "decisions.ndjson").write_bytes(b"decisions of the killed run\n")
    (tmp_path / JOURNAL).write_text(done.name)
    from adapter.sinks import recover

    recover(tmp_path)
    assert (tmp_path / "claims.ndjson").read_bytes() == b"claims of the killed run\n"
    assert not (tmp_path / JOURNAL).exists() and not list(tmp_path.glob(f"{RUN_PREFIX}*"))
    assert run("replay", str(GOOD), "--out", str(tmp_path))[0] == 0
    assert (tmp_path / "decisions.ndjson").read_bytes() == first


def test_two_runs_into_one_directory_are_not_mixed(tmp_path: Path) -> None:
    from adapter.sinks import DirectorySink

    with DirectorySink(tmp_path):
        code, _, err = run("replay", str(GOOD), "--out", str(tmp_path))
    assert code == 2 and "another g0129 run is writing there" in err
