"""Streaming replay: partitions, workers and shards change how the work is cut, never the results."""

from __future__ import annotations

import errno
import io
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest

import adapter.replay
import adapter.spill
from adapter import jsonio
from adapter.cli import main
from adapter.fhir_models import validate

from .conftest import FIXTURES, INVALID_FIXTURES

FILES = ("decisions", "claims", "errors")


def replay(out: Path, *args: str) -> tuple[int, dict[str, bytes]]:
    code = main(["replay", *args, "--out", str(out), "--no-progress"], stdout=io.StringIO(), stderr=io.StringIO())
    return code, {name: (out / f"{name}.ndjson").read_bytes() for name in FILES}


def lines(outputs: dict[str, bytes]) -> dict[str, list[bytes]]:
    return {name: sorted(data.splitlines()) for name, data in outputs.items()}


@pytest.fixture
def small_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions of ~20 KB in groups of ~5 KB: the fixtures spread over a few dozen
    partitions, each decided a few patients at a time."""
    monkeypatch.setattr(adapter.replay, "PARTITION_BYTES", 20_000)
    monkeypatch.setattr(adapter.replay, "GROUP_BYTES", 5_000)


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, bytes]]:
    """The scenarios replayed as one partition, in one process."""
    return replay(tmp_path_factory.mktemp("whole"), str(FIXTURES), str(INVALID_FIXTURES), "--workers", "1")


def test_partitions_decide_as_one_whole_and_workers_write_the_same_bytes(tmp_path: Path, whole, small_partitions) -> None:
    code, one = replay(tmp_path / "one", str(FIXTURES), str(INVALID_FIXTURES), "--workers", "1")
    assert (code, lines(one)) == (whole[0], lines(whole[1]))
    assert one["decisions"].count(b"\n") > 50 and one["errors"], "every scenario decided, the invalid ones reported"
    code, two = replay(tmp_path / "two", str(FIXTURES), str(INVALID_FIXTURES), "--workers", "2")
    assert (code, two) == (whole[0], one), "byte for byte, whatever the number of workers"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_summary_counts_what_the_groups_wrote(tmp_path: Path, small_partitions, workers: str) -> None:
    """Each group counts its outcomes and findings and a partition adds its groups' up: the
    summary says what decisions.ndjson holds, however many groups and processes the work took."""
    stdout = io.StringIO()
    main(["replay", str(FIXTURES), "--out", str(tmp_path), "--no-progress", "--workers", workers], stdout=stdout, stderr=io.StringIO())
    decisions = [orjson.loads(line) for line in (tmp_path / "decisions.ndjson").read_bytes().splitlines()]
    outcomes = Counter(d["outcome"] for d in decisions)
    findings = Counter((f["rule"], f["severity"]) for d in decisions for f in d["findings"])
    summary = stdout.getvalue()
    assert f"outcomes: bill {outcomes['bill']}, review {outcomes['review']}, do-not-bill {outcomes['do-not-bill']}\n" in summary
    said: Counter[tuple[str, str]] = Counter()
    for line in summary.split("findings by rule:\n")[1].splitlines():  # "    DAY-SERVICES    warning 2, info 6"
        rule, counts = line.split(None, 1)
        for count in counts.split(", "):
            severity, n = count.split()
            said[(rule, severity)] = int(n)
    assert said == findings and len(findings) > 10


def test_shards_split_the_patients_between_them(tmp_path: Path, whole, small_partitions) -> None:
    union: dict[str, list[bytes]] = defaultdict(list)
    encounters: list[str] = []
    for index in range(3):
        _, out = replay(tmp_path / f"shard-{index}", str(FIXTURES), str(INVALID_FIXTURES), "--shard", f"{index}/3")
        assert out["decisions"], f"shard {index}/3 has patients"
        for name, data in out.items():
            union[name].extend(data.splitlines())
        encounters += [orjson.loads(d)["encounter"] for d in out["decisions"].splitlines()]
    assert len(encounters) == len(set(encounters)), "no encounter is decided by two shards"
    assert {name: sorted(found) for name, found in union.items()} == lines(whole[1])


def _bulk_export(bundles: list[Path], folder: Path) -> None:
    """The bundles' resources as a FHIR Bulk Data export: one NDJSON file per resource type,
    no Bundle, no fullUrl."""
    by_type: dict[str, list[bytes]] = defaultdict(list)
    for path in bundles:
        for item in jsonio.loads(path.read_bytes())["entry"]:
            by_type[item["resource"]["resourceType"]].append(jsonio.dumps(item["resource"]))
    folder.mkdir()
    for rtype, found in by_type.items():
        (folder / f"{rtype}.ndjson").write_bytes(b"\n".join(found) + b"\n")


def test_a_bulk_export_decides_as_its_bundles(tmp_path: Path, small_partitions) -> None:
    # Transaction bundles refer by urn:uuid fullUrls, which an export does not have.
    bundles = [p for p in sorted(FIXTURES.glob("*.json")) if ".expected." not in p.name and b"urn:uuid:" not in p.read_bytes()]
    _bulk_export(bundles, tmp_path / "export")
    _, from_bundles = replay(tmp_path / "a", *map(str, bundles), "--workers", "1")
    _, from_export = replay(tmp_path / "b", str(tmp_path / "export"), "--workers", "2")
    assert lines(from_export)["decisions"] == lines(from_bundles)["decisions"]
    assert lines(from_export)["claims"] == lines(from_bundles)["claims"]


def test_ndjson_cut_into_pieces_routes_as_read_whole(tmp_path: Path, small_partitions, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pieces of ~2 KB: each export file is routed by several tasks (two processes with
    # --workers 2), and still every partition holds its records in the order read and every
    # error names its line of the file.
    bundles = [p for p in sorted(FIXTURES.glob("*.json")) if ".expected." not in p.name and b"urn:uuid:" not in p.read_bytes()]
    export = tmp_path / "export"
    _bulk_export(bundles, export)
    claims = (export / "Claim.ndjson").read_bytes().splitlines(keepends=True)
    (export / "Claim.ndjson").write_bytes(b"".join([*claims[:5], b'{"resourceType": "Claim", "id": \n', *claims[5:]]))
    _, whole = replay(tmp_path / "whole", str(export), "--workers", "1")
    assert orjson.loads(whole["errors"])["source"] == f"{export / 'Claim.ndjson'}:6"
    monkeypatch.setattr(adapter.replay, "PIECE_BYTES", 2_000)
    monkeypatch.setattr(adapter.replay, "MAX_PIECE_BYTES", 2_000)
    # One worker routes each file whole: what it holds goes to a new spill file every 2 KB.
    monkeypatch.setattr(adapter.replay, "SPILL_FILE_BYTES", 2_000)
    assert (export / "Claim.ndjson").stat().st_size > 5 * 2_000, "the Claims are cut into pieces"
    written: list[Path] = []

    def write_piece(path: Path, blocks: dict[int, list[bytes]], groups: int) -> dict[int, tuple[int, int]]:
        written.append(path)
        return adapter.spill.write_piece(path, blocks, groups)

    monkeypatch.setattr(adapter.replay, "write_piece", write_piece)
    for workers in ("1", "2"):
        _, pieces = replay(tmp_path / f"pieces-{workers}", str(export), "--workers", workers)
        assert pieces == whole, f"byte for byte with --workers {workers}"
    assert any(path.name.endswith("-0003.spill") for path in written), "one worker's Claims went to several files"


def test_decimals_keep_their_text_through_the_partitions(tmp_path: Path, small_partitions) -> None:
    export = tmp_path / "export"
    _bulk_export([FIXTURES / "59-claim-with-decimals-and-vendor-extensions.json"], export)
    claim_line = (export / "Claim.ndjson").read_bytes()
    assert b"125.00" in claim_line
    _, out = replay(tmp_path / "out", str(export))
    assert out["claims"].count(b"125.00") == claim_line.count(b"125.00")


def test_every_claim_written_is_valid_r4_as_a_whole(whole) -> None:
    # The default validation looks at what we add; the whole Claims still validate.
    claims = whole[1]["claims"].splitlines()
    assert claims
    for line in claims:
        validate(orjson.loads(line), "claims.ndjson")


@pytest.mark.parametrize("argv", [["--shard", "3/3"], ["--shard", "-1/2"], ["--shard", "x"], ["--workers", "0"], ["--validate", "some"]])
def test_bad_workers_and_shards_are_usage_errors(tmp_path: Path, argv: list[str]) -> None:
    err = io.StringIO()
    assert main(["replay", str(FIXTURES), "--out", str(tmp_path), *argv], stdout=io.StringIO(), stderr=err) == 2
    option = argv[0]
    assert f"argument {option}:" in err.getvalue(), "argparse names the option at fault"
    assert not (tmp_path / "decisions.ndjson").exists(), "nothing is read or written"


def test_a_number_beyond_range_is_that_lines_error_and_the_rest_is_decided(tmp_path: Path, small_partitions) -> None:
    # Routing reads only the members that route a resource; a number beyond any double (1e400)
    # in another member is found when its partition is read, and reported with its line there.
    bundles = [p for p in sorted(FIXTURES.glob("*.json")) if ".expected." not in p.name and b"urn:uuid:" not in p.read_bytes()]
    export = tmp_path / "export"
    _bulk_export(bundles, export)
    _, clean = replay(tmp_path / "clean", str(export), "--workers", "1")
    claims = (export / "Claim.ndjson").read_bytes().splitlines(keepends=True)
    bad_claim = claims[0].replace(b'"resourceType":"Claim","id":"', b'"resourceType":"Claim","id":"huge-').replace(b'"status":', b'"extension":[{"url":"https://ehr.example/x","valueDecimal":1e400}],"status":', 1)
    assert b"1e400" in bad_claim
    (export / "Claim.ndjson").write_bytes(b"".join([*claims[:2], bad_claim, *claims[2:]]))
    organizations = (export / "Organization.ndjson").read_bytes()
    (export / "Organization.ndjson").write_bytes(organizations + b'{"resourceType":"Organization","id":"far","extension":[{"url":"https://ehr.example/x","valueDecimal":-2E+999}]}\n')
    bundle = b'{"resourceType":"Bundle","type":"collection","total":1e400}\n'
    (export / "Bundle.ndjson").write_bytes(bundle)
    for workers in ("1", "2"):
        _, out = replay(tmp_path / f"out-{workers}", str(export), "--workers", workers)
        errors = {e["source"]: e["message"] for e in map(orjson.loads, out["errors"].splitlines())}
        assert set(errors) == {
            f"{export / 'Claim.ndjson'}:3",
            f"{export / 'Organization.ndjson'}:{len(organizations.splitlines()) + 1}",
            f"{export / 'Bundle.ndjson'}:1",
        }, errors
        assert all("malformed JSON" in m and "beyond the range" in m for m in errors.values()), errors
        assert (out["decisions"], out["claims"]) == (clean["decisions"], clean["claims"])
    # Each shard reads the shared Organizations, and one of them reports the bad one.
    reported = [orjson.loads(e)["source"] for index in range(3) for e in replay(tmp_path / f"shard-{index}", str(export), "--shard", f"{index}/3")[1]["errors"].splitlines()]
    assert sorted(reported) == sorted(errors), "every error reported by exactly one shard"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_under_out_stops_the_run_with_one_line_and_keeps_the_outputs(
    tmp_path: Path, small_partitions, monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    # The partitions are written under --out, by the routing processes: a disk that fills up
    # there is one line and exit 1, never a traceback, and the last run's outputs stay whole.
    out = tmp_path / "out"
    code, before = replay(out, str(FIXTURES), "--workers", workers)
    assert code == 0 and before["decisions"]

    def full(path: Path, blocks: object, groups: int) -> dict[int, tuple[int, int]]:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(adapter.replay, "write_piece", full)
    err = io.StringIO()
    code = main(["replay", str(FIXTURES), "--out", str(out), "--workers", workers, "--no-progress"], stdout=io.StringIO(), stderr=err)
    assert code == 1
    assert err.getvalue().count("\n") == 1 and "No space left on device" in err.getvalue(), err.getvalue()
    assert err.getvalue().startswith(f"g0129: --out {out}: the run's files could not be written")
    assert {name: (out / f"{name}.ndjson").read_bytes() for name in FILES} == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".g0129-run")] == [], "the failed run's directory is gone"


def test_a_reader_gone_from_stderr_is_no_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `g0129 replay ... 2>&1 | head`: an error line meets a closed pipe mid-run. That is the
    # broken pipe main handles quietly, not a file under --out that could not be written.
    attempted: list[str] = []

    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            attempted.append(text)
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    class Stdout(io.StringIO):
        def fileno(self) -> int:
            return 1

    monkeypatch.setattr(os, "dup2", lambda *fds: None)  # main points stdout at /dev/null
    monkeypatch.setattr(sys, "stdout", Stdout())
    code = main(["replay", str(INVALID_FIXTURES), "--out", str(tmp_path / "out"), "--no-progress"], stdout=io.StringIO(), stderr=Closed())
    assert code == 1
    assert attempted and not any("could not be written" in text for text in attempted)
