from __future__ import annotations

from pathlib import Path

import pytest

from adapter.ruleset import RuleSet, load_ruleset

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


@pytest.fixture(scope="session")
def ruleset() -> RuleSet:
    return load_ruleset()
