"""Every public R4 example in ../shared/corpus goes through ingest and the decision path.

None of them is a PHP/OT case (corpus-notes.md), so the stock tables decide nothing there. To
push real data through every step (Case, rules, annotation, R4 validation of the Claims), a
second run treats the corpus's own procedure codes as OT sessions and its encounter types as
programs, via a copy of mappings/ with those codes added.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from adapter.ingest import load_paths
from adapter.pipeline import evaluate
from adapter.ruleset import DEFAULT_MAPPINGS_DIR, load_ruleset

from .conftest import ROOT

CORPUS = ROOT.parent / "shared" / "corpus"

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/corpus is not beside the checkout")


@pytest.fixture(scope="module")
def loaded():
    return load_paths([CORPUS])


def test_every_corpus_file_is_read_or_clearly_rejected(loaded) -> None:
    index, errors, files = loaded
    assert files == len(list(CORPUS.rglob("*.json")))
    assert len(index) > 6_000  # 6,732 resources in 307 files, a few duplicates
    for error in errors:
        assert error.source and error.message and "\n" not in str(error)


def test_stock_tables_decide_the_corpus_without_error(loaded, ruleset) -> None:
    index, _, _ = loaded
    result = evaluate(index, ruleset)
    assert result.errors == []


def test_corpus_pushed_through_every_step(loaded, tmp_path: Path) -> None:
    index, _, _ = loaded
    procedure_codes = Counter(
        (c.get("system"), c.get("code"))
        for e in index.of_type("Procedure")
        for c in (e.resource.get("code") or {}).get("coding", [])
        if c.get("system") and c.get("code")
    )
    mappings = tmp_path / "mappings"
    shutil.copytree(DEFAULT_MAPPINGS_DIR, mappings)
    table = yaml.safe_load((mappings / "ot_sessions.yaml").read_text())
    table["codes"] += [{"system": s, "code": c} for (s, c), _ in procedure_codes.most_common(40)]
    (mappings / "ot_sessions.yaml").write_text(yaml.safe_dump(table))
    ruleset = load_ruleset(mappings)

    result = evaluate(index, ruleset)
    assert len(result.decisions) > 100
    outcomes = Counter(d.outcome for d in result.decisions)
    assert set(outcomes) <= {"bill", "review", "do-not-bill"}
    for decision in result.decisions:
        assert decision.findings, "every decided corpus case explains itself"
    # Claims that the EHR wrote and we annotated are valid R4 or reported as such, never lost.
    annotated = {c.key for c in result.claims}
    failed = {e.source for e in result.errors}
    for decision in result.decisions:
        key = decision.claim or None
        if key:
            assert key in annotated or any(key in s for s in failed)
