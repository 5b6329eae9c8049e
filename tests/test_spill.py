"""Partitions on disk: what goes in comes back byte for byte, in the order of the pieces."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.spill import Spill, bucket, line_record, piece_path, record, write_piece


def test_records_come_back_as_written_in_the_order_of_the_pieces(tmp_path: Path) -> None:
    # Three pieces routed (in any order, by any process), each to its own file; a partition
    # reads its records piece after piece, line ends (LF, CRLF, none) gone.
    written: dict[int, dict[int, list[tuple[str, str | None, bytes]]]] = {}  # piece -> partition -> records
    extents = {}
    for piece in (2, 0, 1):
        blocks: dict[int, list[bytes]] = {}
        written[piece] = {0: [], 1: [], 2: []}
        for n in range(piece * 20, piece * 20 + 20):
            if piece == 1 and n % 3 == 2:
                continue  # piece 1 holds nothing for partition 2: no block of it there
            resource = b'{"resourceType":"Claim","id":"c%d","total":{"value":125.00}}' % n
            full_url = f"https://ehr.example.org/fhir/Claim/c{n}" if n % 2 else None
            end = (b"\r\n", b"\n", b"")[n % 3]
            record(blocks.setdefault(n % 3, []), f"claims.ndjson:{n}", full_url, resource + end)
            written[piece][n % 3].append((f"claims.ndjson:{n}", full_url, resource))
        extents[piece] = write_piece(piece_path(tmp_path, piece), blocks)
    spill = Spill(3)
    for piece in (0, 1, 2):
        spill.add(piece_path(tmp_path, piece), extents[piece], "claims.ndjson")
    for partition in range(3):
        assert spill.read(partition) == [[r for piece in (0, 1, 2) for r in written[piece][partition]]]
    assert sum(spill.sizes) == sum(p.stat().st_size for p in tmp_path.iterdir())


def test_a_line_of_the_pieces_file_is_written_with_its_number_alone(tmp_path: Path) -> None:
    # An NDJSON line's record names its line; its source is the piece's file and that line.
    block: list[bytes] = []
    line_record(block, 41, b'{"resourceType":"Claim","id":"c1","total":{"value":125.00}}\r')
    record(block, "export/Claim.ndjson:42", "https://ehr.example.org/fhir/Claim/c2", b'{"resourceType":"Claim","id":"c2"}')
    line_record(block, 1_000_001, b'{"resourceType":"Claim","id":"c3"}')
    spill = Spill(1)
    spill.add(piece_path(tmp_path, 0), write_piece(piece_path(tmp_path, 0), {0: block}), "export/Claim.ndjson")
    assert spill.read(0) == [
        [
            ("export/Claim.ndjson:41", None, b'{"resourceType":"Claim","id":"c1","total":{"value":125.00}}\r'),
            ("export/Claim.ndjson:42", "https://ehr.example.org/fhir/Claim/c2", b'{"resourceType":"Claim","id":"c2"}'),
            ("export/Claim.ndjson:1000001", None, b'{"resourceType":"Claim","id":"c3"}'),
        ]
    ]


def test_a_partition_reads_group_by_group_each_in_the_order_read(tmp_path: Path) -> None:
    # Two partitions of four groups, routed in two pieces: records of groups 3, 0 and 1 of
    # partition 1, one of group 2 of partition 0. A partition comes back group by group (the
    # empty ones left out), each group's records in the order of the pieces, then of the lines.
    pieces: list[dict[int, list[bytes]]] = [{}, {}]
    for n, group in enumerate((3, 0, 3, 1, 0, 3)):
        line_record(pieces[n // 3].setdefault(1 * 4 + group, []), n + 1, b'{"resourceType":"Procedure","id":"p%d"}' % n)
    line_record(pieces[1].setdefault(0 * 4 + 2, []), 9, b'{"resourceType":"Procedure","id":"p9"}')
    spill = Spill(2)
    for piece in (0, 1):
        spill.add(piece_path(tmp_path, piece), write_piece(piece_path(tmp_path, piece), pieces[piece], groups=4), f"Procedure-{piece}.ndjson")
    ids = [[(source, resource[-4:-2]) for source, _, resource in group] for group in spill.read(1)]
    assert ids == [
        [("Procedure-0.ndjson:2", b"p1"), ("Procedure-1.ndjson:5", b"p4")],
        [("Procedure-1.ndjson:4", b"p3")],
        [("Procedure-0.ndjson:1", b"p0"), ("Procedure-0.ndjson:3", b"p2"), ("Procedure-1.ndjson:6", b"p5")],
    ]
    assert spill.read(0) == [[("Procedure-1.ndjson:9", None, b'{"resourceType":"Procedure","id":"p9"}')]]


def test_an_empty_partition_reads_as_nothing_and_an_empty_piece_writes_no_file(tmp_path: Path) -> None:
    assert write_piece(piece_path(tmp_path, 0), {}) == {}
    assert write_piece(piece_path(tmp_path, 0), {3: []}) == {}  # a block with no record is not written
    assert not list(tmp_path.iterdir())
    assert Spill(2).read(1) == []


def test_a_piece_file_cut_short_is_an_error_never_fewer_records(tmp_path: Path) -> None:
    block: list[bytes] = []
    record(block, "claims.ndjson:1", None, b'{"resourceType":"Claim","id":"c1"}')
    spill = Spill(1)
    spill.add(piece_path(tmp_path, 0), write_piece(piece_path(tmp_path, 0), {0: block}), "claims.ndjson")
    written = piece_path(tmp_path, 0).read_bytes()
    piece_path(tmp_path, 0).write_bytes(written[:10])
    with pytest.raises(OSError, match="cut short"):
        spill.read(0)


def test_a_piece_file_changed_under_the_replay_is_an_error(tmp_path: Path) -> None:
    block: list[bytes] = []
    record(block, "claims.ndjson:1", None, b'{"resourceType":"Claim","id":"c1"}')
    line_record(block, 12, b'{"resourceType":"Claim","id":"c2"}')
    spill = Spill(1)
    spill.add(piece_path(tmp_path, 0), write_piece(piece_path(tmp_path, 0), {0: block}), "claims.ndjson")
    written = piece_path(tmp_path, 0).read_bytes()
    # (The last: a line number of a digit that is not 0-9, "²", in as many bytes.)
    for changed in (written.replace(b"\n", b" "), written.replace(b"12\n", b"1x\n", 1), written.replace(b"12\n", "²\n".encode(), 1)):
        piece_path(tmp_path, 0).write_bytes(changed)  # the same length, other bytes
        with pytest.raises(OSError, match="changed while the replay ran"):
            spill.read(0)


def test_buckets_are_stable_across_processes_and_machines() -> None:
    # A keyed hash, never Python's per-process `hash`: shard 2 of 4 is the same patients on
    # every machine of a fan-out.
    assert bucket("Patient/p1", 1, 1) == (0, 0, 0)
    shards = {bucket(f"Patient/{n}", 4, 8)[0] for n in range(200)}
    assert shards == {0, 1, 2, 3}
    groups = {bucket(f"Patient/{n}", 4, 8, 5)[2] for n in range(200)}
    assert groups == {0, 1, 2, 3, 4}
    # Pinned: they must never change between releases (a group only orders a partition's output).
    assert bucket("Patient/p1", 4, 16) == (2, 6, 0)
    assert bucket("Patient/p1", 4, 16, 8)[:2] == (2, 6)
