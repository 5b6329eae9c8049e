from __future__ import annotations

import io
import random
from pathlib import Path

import orjson
import pytest

import adapter.ingest
from adapter.errors import InvalidJSON, InvalidResource, NotFHIR
from adapter.ingest import Entry, Index, _bounded_lines, load_bytes, load_paths, ndjson_spans, read_file


def _index(*resources: dict, bundle: dict | None = None) -> tuple[Index, list[Entry]]:
    data = bundle or {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    entries, errors = load_bytes(orjson.dumps(data), "t.json")
    assert not errors
    index = Index()
    for e in entries:
        index.add(e)
    return index, entries


def test_reference_styles_resolve() -> None:
    bundle = {
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:8f1c", "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "http://ehr.example.org/fhir/Practitioner/pr1", "resource": {"resourceType": "Practitioner", "id": "pr1"}},
            {
                "fullUrl": "http://ehr.example.org/fhir/Claim/c1",
                "resource": {
                    "resourceType": "Claim", "id": "c1",
                    "contained": [{"resourceType": "Coverage", "id": "cov"}],
                },
            },
        ],
    }
    index, entries = _index(bundle=bundle)
    claim = next(e for e in entries if e.type == "Claim")
    assert index.resolve({"reference": "urn:uuid:8f1c"}, claim)["resourceType"] == "Patient"
    assert index.resolve({"reference": "Practitioner/pr1"}, claim)["id"] == "pr1"
    assert index.resolve({"reference": "http://ehr.example.org/fhir/Practitioner/pr1/_history/3"}, claim)["id"] == "pr1"
    assert index.resolve({"reference": "#cov"}, claim)["resourceType"] == "Coverage"
    assert index.resolve({"identifier": {"value": "x"}}, claim) is None
    assert index.resolve({"display": "private"}, claim) is None
    assert index.resolve({"reference": "Practitioner/missing"}, claim) is None


def test_relative_reference_prefers_the_entrys_own_server() -> None:
    bundle = {
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"fullUrl": "http://a.example/fhir/Patient/45", "resource": {"resourceType": "Patient", "id": "45", "gender": "male"}},
            {"fullUrl": "http://b.example/fhir/Patient/45", "resource": {"resourceType": "Patient", "id": "45", "gender": "female"}},
            {"fullUrl": "http://b.example/fhir/Encounter/e", "resource": {"resourceType": "Encounter", "id": "e"}},
        ],
    }
    index, entries = _index(bundle=bundle)
    enc = next(e for e in entries if e.type == "Encounter")
    assert index.resolve({"reference": "Patient/45"}, enc)["gender"] == "female"


def test_newer_version_wins_and_duplicates_collapse() -> None:
    old = {"resourceType": "Claim", "id": "c", "meta": {"versionId": "2"}, "status": "draft"}
    new = {"resourceType": "Claim", "id": "c", "meta": {"versionId": "3"}, "status": "active"}
    index, _ = _index(new, old)
    assert len(index.of_type("Claim")) == 1 and index.by_key["Claim/c"].resource["status"] == "active"


def test_an_index_over_the_shared_resources_reads_as_one_built_whole() -> None:
    # A replay decides each group of patients in an index over the shared resources: it must
    # answer as an index holding both would, and leave the shared index as it was.
    def entry(rtype: str, rid: str, version: str | None = None, url: str | None = None) -> Entry:
        meta = {"meta": {"versionId": version}} if version else {}
        return Entry({"resourceType": rtype, "id": rid, **meta}, "x.ndjson:1", url)

    shared = Index()
    shared_entries = [
        entry("Organization", "o1", url="https://ehr.example.org/fhir/Organization/o1"),
        entry("Device", "d1", "1", "https://ehr.example.org/fhir/Device/d1"),
        entry("Practitioner", "pr1"),
    ]
    own_entries = [
        entry("Encounter", "e1"),
        entry("Device", "d1", "2", "https://ehr.example.org/fhir/Device/d1"),  # newer than the shared one
        entry("Organization", "o1"),  # not newer: the shared one stays
        entry("Practitioner", "pr1", "1", "https://other.example.org/fhir/Practitioner/pr1"),
    ]
    for e in shared_entries:
        shared.add(e)
    before = (dict(shared.by_key), dict(shared.by_full_url), {t: list(v) for t, v in shared.by_type.items()})
    over, whole = Index.over(shared), Index()
    for e in shared_entries:
        whole.add(e)
    for e in own_entries:
        over.add(e)
        whole.add(e)
    for index in (over, whole):
        assert index.get("Device/d1") is own_entries[1] and index.get("Organization/o1") is shared_entries[0]
        assert index.resolve_entry({"reference": "Encounter/e1"}) is own_entries[0]
        assert index.resolve_entry({"reference": "https://ehr.example.org/fhir/Organization/o1"}) is shared_entries[0]
        assert index.resolve_entry({"reference": "https://other.example.org/fhir/Practitioner/pr1"}) is own_entries[3]
    for rtype in ("Organization", "Device", "Practitioner", "Encounter", "Claim"):
        assert over.of_type(rtype) == whole.of_type(rtype), rtype
    assert len(over) == len(whole) == 4
    # The server's copy of a shared resource stands for it, its old fullUrl gone with it.
    server = entry("Organization", "o1", url="https://ehr.example.org/fhir/Organization/o1-moved")
    over.replace(server)
    whole.replace(server)
    for index in (over, whole):
        assert index.get("Organization/o1") is server
        assert index.by_url("https://ehr.example.org/fhir/Organization/o1") is None
        assert index.of_type("Organization") == [server]
    assert (dict(shared.by_key), dict(shared.by_full_url), {t: list(v) for t, v in shared.by_type.items()}) == before


def test_nested_bundles_delete_and_response_only_entries() -> None:
    inner = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resourceType": "Encounter", "id": "in"}}]}
    outer = {
        "resourceType": "Bundle", "type": "batch-response",
        "entry": [
            {"resource": inner},
            {"response": {"status": "200 ok"}},
            {"request": {"method": "DELETE", "url": "Patient/x"}, "resource": {"resourceType": "Patient", "id": "x"}},
        ],
    }
    index, _ = _index(bundle=outer)
    assert set(index.by_key) == {"Encounter/in"}


@pytest.mark.parametrize(
    "data,error",
    [
        (b"{not json", InvalidJSON),
        (b"[1, 2]", NotFHIR),
        (b'{"name": "x"}', NotFHIR),
        (b'{"resourceType": "Widget"}', InvalidResource),
        (b'{"resourceType": "Patient", "id": 5}', InvalidResource),
    ],
)
def test_bad_input_is_a_typed_error_naming_the_source(data: bytes, error: type) -> None:
    entries, errors = load_bytes(data, "bad.json")
    assert entries == [] and len(errors) == 1
    assert isinstance(errors[0], error) and str(errors[0]).startswith("bad.json: ")


def test_ndjson_errors_name_the_line_and_keep_the_good_lines() -> None:
    data = b'{"resourceType": "Patient", "id": "a"}\n{oops\n\n{"resourceType": "Patient", "id": "b"}\n'
    entries, errors = load_bytes(data, "export.ndjson", ndjson=True)
    assert [e.id for e in entries] == ["a", "b"]
    assert [e.source for e in errors] == ["export.ndjson:2"]


def test_bad_bundle_entry_is_reported_and_the_others_kept() -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"id": "x"}}, {"resource": {"resourceType": "Patient", "id": "ok"}}]}
    entries, errors = load_bytes(orjson.dumps(bundle), "b.json")
    assert [e.id for e in entries] == ["ok"]
    assert "Bundle.entry[0]" in str(errors[0])


def test_directories_are_walked_recursively_reading_only_fhir_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.json").write_bytes(b'{"resourceType": "Patient", "id": "p"}')
    (tmp_path / "e.ndjson").write_bytes(b'{"resourceType": "Encounter", "id": "e"}\n')
    (tmp_path / "README.md").write_text("not input")
    (tmp_path / "x.expected.yaml").write_text("decisions: []")
    index, errors, files = load_paths([tmp_path])
    assert (files, errors) == (2, [])
    assert set(index.by_key) == {"Patient/p", "Encounter/e"}


def test_bom_is_tolerated() -> None:
    entries, errors = load_bytes(b'\xef\xbb\xbf{"resourceType": "Patient", "id": "p"}', "bom.json")
    assert errors == [] and entries[0].id == "p"


def _sources(values: list) -> list[tuple[str, object]]:
    return [(v.source, v.value if hasattr(v, "value") else str(v)) for v in values]


@pytest.mark.parametrize("size", [1, 40, 100, 10_000])
def test_spans_of_an_ndjson_file_read_as_the_whole_file(tmp_path: Path, size: int) -> None:
    # A BOM, a blank line, a malformed line, a line over the limit and a last line with no line
    # end: read span by span, every value and error names the same line as read whole.
    path = tmp_path / "Claim.ndjson"
    lines = [
        b'\xef\xbb\xbf{"resourceType":"Claim","id":"c1"}\n',
        b"\n",
        b'{"resourceType":"Claim","id":"c2","total":{"value":125.00}}\r\n',
        b"{not json\n",
        b'{"resourceType":"Claim","id":"' + b"x" * 300 + b'"}\n',
        b'{"resourceType":"Claim","id":"c3"}',
    ]
    path.write_bytes(b"".join(lines))
    spans = ndjson_spans(path, size)
    assert spans[0].start == 0 and spans[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in zip(spans, spans[1:])), "the spans cover the file, in order"
    data = path.read_bytes()
    assert all(span.start == 0 or data[span.start - 1 : span.start] == b"\n" for span in spans), "cut at line ends"
    whole = _sources(list(read_file(path, max_bytes=200)))
    pieces = _sources([v for span in spans for v in read_file(path, max_bytes=200, span=span)])
    assert pieces == whole
    assert [s for s, _ in whole] == [f"{path}:{n}" for n in (1, 3, 4, 5, 6)]
    # A line's value names its line where it is shown too (a debugger, a log of a failed test).
    assert repr(next(read_file(path, max_bytes=200))).startswith(f"Value(source={str(path) + ':1'!r}, ")


@pytest.mark.parametrize("block", [1, 3, 7, 64, 1 << 16])
def test_ndjson_lines_are_cut_at_line_ends_only_whatever_the_blocks_read(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    # Lines of every length around the limit (10 bytes), a CR inside and before a line end, an
    # empty line and a last line with no line end, read in blocks of every size: each line
    # comes back whole without its line end, or as its length when over the limit, and every
    # byte is reported read.
    monkeypatch.setattr(adapter.ingest, "_BLOCK_BYTES", block)
    rng = random.Random(block)
    lines = [b"x" * rng.choice([0, 1, 9, 10, 11, 25]) + rng.choice([b"", b"\r", b"a\rb"]) for _ in range(200)]
    data = b"\n".join(lines)
    expected = [line if len(line) <= 10 else len(line) + (n < len(lines) - 1) for n, line in enumerate(lines)]
    if not lines[-1]:
        expected.pop()  # nothing after the last line end
    reported: list[int] = []
    assert list(_bounded_lines(io.BytesIO(data), 10, on_bytes=reported.append)) == expected
    assert sum(reported) == len(data)
    cut = data.index(b"\n", len(data) // 2) + 1  # a span ending at a line end
    assert list(_bounded_lines(io.BytesIO(data), 10, cut)) == expected[: data[:cut].count(b"\n")]
