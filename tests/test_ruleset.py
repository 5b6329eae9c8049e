"""The rule tables: checked at load, every fact in them, a site's copy over the bundled one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapter.errors import MappingError
from adapter.ruleset import DEFAULT_MAPPINGS_DIR, RuleSet, check_tables, diff_tables, load_ruleset

from .catalog import README, readme_catalog, render
from .conftest import ROOT
from .factories import decision_of, php_day


def site_copy(tmp_path: Path, name: str, text: str) -> Path:
    """A site's tables directory holding one table (the rest comes from the bundled tables)."""
    site = tmp_path / "site"
    (site / name).parent.mkdir(parents=True, exist_ok=True)
    (site / name).write_text(text, encoding="utf-8")
    return site


def edited(name: str, old: str, new: str) -> str:
    text = (DEFAULT_MAPPINGS_DIR / name).read_text(encoding="utf-8")
    assert old in text, old
    return text.replace(old, new, 1)


def problems(site: Path) -> list[str]:
    found = check_tables(site)
    with pytest.raises(MappingError) as raised:
        load_ruleset(site)
    assert all(p in str(raised.value) for p in found)
    return found


def test_the_tables_ship_inside_the_package() -> None:
    assert DEFAULT_MAPPINGS_DIR == ROOT / "adapter" / "mappings"
    assert check_tables(DEFAULT_MAPPINGS_DIR) == []


def test_the_readme_catalog_is_made_from_the_tables(ruleset: RuleSet) -> None:
    assert readme_catalog(README.read_text(encoding="utf-8")) == render(ruleset), "run: python3 -m tests.catalog"


def test_every_source_resolves_in_the_repository() -> None:
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")))
    for path in sorted(DEFAULT_MAPPINGS_DIR.rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        assert "g0129-rules.md" not in text and "../shared" not in text, path.name
        for anchor in re.findall(r"docs/rules\.md#([\w-]+)", text):
            assert anchor in anchors, f"{path.name}: docs/rules.md#{anchor}"


# -- a wrong edit is named, never taken in silence -----------------------------------------------

def test_an_unquoted_code_is_refused_with_how_to_quote_it(tmp_path: Path) -> None:
    # YAML reads 0430 unquoted as the octal number 280: the code would be lost without a word.
    site = site_copy(tmp_path, "lines.yaml", edited("lines.yaml", 'revenue_default: "0430"', "revenue_default: 0430"))
    [problem] = problems(site)
    assert "lines.yaml: revenue_default: 280 is read as a number" in problem and 'quotes (e.g. "0430"' in problem


def test_a_table_that_is_not_yaml_is_named_with_where_it_breaks(tmp_path: Path) -> None:
    site = site_copy(tmp_path, "lines.yaml", edited("lines.yaml", 'revenue_default: "0430"', 'revenue_default: ["0430"'))
    [problem] = problems(site)
    assert "lines.yaml: not valid YAML" in problem and "line " in problem


def test_bill_types_written_as_numbers_are_refused(tmp_path: Path) -> None:
    site = site_copy(tmp_path, "bill_types.yaml", edited("bill_types.yaml", 'PHP: ["13", "76", "85"]', "PHP: [13, 76, 85]"))
    found = problems(site)
    assert {p.split(": ")[1] for p in found} == {"allowed.PHP[0]", "allowed.PHP[1]", "allowed.PHP[2]"}


def test_accepts_must_be_true_false_or_null(tmp_path: Path) -> None:
    site = site_copy(tmp_path, "payers/aetna.yaml", edited("payers/aetna.yaml", "PHP: {accepts: null", 'PHP: {accepts: "no"'))
    [problem] = problems(site)
    assert "aetna.yaml: policy.PHP.accepts" in problem and "true, false or null" in problem


def test_a_typo_in_a_key_is_refused(tmp_path: Path) -> None:
    site = site_copy(tmp_path, "ot_sessions.yaml", edited("ot_sessions.yaml", "minimum_minutes: 45", "minimum_minuts: 45"))
    assert [p.split(": ", 1)[1] for p in problems(site)] == ["minimum_minuts: unknown key (a typo?)"]


def test_an_unknown_rule_or_kind_of_finding_is_refused(tmp_path: Path) -> None:
    text = edited("rules.yaml", "  - id: DOCUMENTATION\n", "  - id: DOCUMENTAION\n")
    found = problems(site_copy(tmp_path, "rules.yaml", text))
    assert any("rule DOCUMENTAION is not implemented" in p for p in found)
    text = edited("rules.yaml", "      remote: {severity: error", "      remote_session: {severity: error")
    found = problems(site_copy(tmp_path / "b", "rules.yaml", text))
    assert any("findings.remote_session: unknown kind of finding" in p for p in found)
    assert any("findings.remote: missing" in p for p in found)


def test_every_problem_of_a_copy_is_listed_at_once(tmp_path: Path) -> None:
    site = site_copy(tmp_path, "ot_sessions.yaml", edited("ot_sessions.yaml", "minimum_minutes: 45", "minimum_minutes: forty-five"))
    (site / "site.yaml").write_text("time_zone: Mars/Olympus\npossible_time_zones: []\nzone: x\n")
    found = problems(site)
    assert any("ot_sessions.yaml: minimum_minutes" in p for p in found)
    assert any("site.yaml: zone: unknown key" in p for p in found)


def test_an_unknown_parameter_in_the_catalog_text_is_refused(tmp_path: Path) -> None:
    text = edited("rules.yaml", "lasts {minimum_minutes} minutes", "lasts {minimum_minute} minutes")
    [problem] = problems(site_copy(tmp_path, "rules.yaml", text))
    assert "{minimum_minute}" in problem and "checks" in problem


def test_a_copy_with_no_table_is_a_wrong_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert problems(tmp_path / "empty") == [f"{tmp_path / 'empty'}: no rule tables found (*.yaml)"]


# -- what a site changes, it changes -------------------------------------------------------------

def test_the_catalog_states_the_parameters_the_tables_hold(tmp_path: Path) -> None:
    site = site_copy(tmp_path, "ot_sessions.yaml", edited("ot_sessions.yaml", "minimum_minutes: 45", "minimum_minutes: 30"))
    rules = load_ruleset(site)
    assert "30 minutes or more" in rules.rule("SESSION-LENGTH").checks and "45" not in rules.rule("SESSION-LENGTH").checks


def test_a_severity_edited_in_the_tables_changes_the_outcome(tmp_path: Path, ruleset: RuleSet) -> None:
    r = php_day()
    del r["goal"]  # measurable goals missing: a DOCUMENTATION warning by default
    assert decision_of(r, ruleset).outcome == "bill"
    text = edited("rules.yaml", "      missing: {severity: warning", "      missing: {severity: review")
    assert decision_of(r, load_ruleset(site_copy(tmp_path, "rules.yaml", text))).outcome == "review"


def test_a_rule_left_out_of_a_copy_still_checks(tmp_path: Path, ruleset: RuleSet) -> None:
    doc = yaml.safe_load((DEFAULT_MAPPINGS_DIR / "rules.yaml").read_text())
    doc["rules"] = [r for r in doc["rules"] if r["id"] != "REMOTE"]
    rules = load_ruleset(site_copy(tmp_path, "rules.yaml", yaml.safe_dump(doc)))
    assert [r.id for r in rules.rules] == [r.id for r in ruleset.rules]
    r = php_day()
    r["encounter"]["class"]["code"] = "VR"
    assert decision_of(r, rules).outcome == "do-not-bill"


def test_a_copy_made_before_findings_had_severities_still_loads(tmp_path: Path, ruleset: RuleSet) -> None:
    old = {"version": "2026.11", "rules": [
        {"id": "PROGRAM", "checks": "The encounter is part of a PHP or IOP program.", "when_violated": "error",
         "source": "g0129-rules.md R01", "status": "CONFIRMED"},
    ]}
    rules = load_ruleset(site_copy(tmp_path, "rules.yaml", yaml.safe_dump(old)))
    assert rules.rule("PROGRAM").severities == ruleset.rule("PROGRAM").severities


def test_diff_says_what_a_copy_changes_rule_by_rule_and_code_by_code(tmp_path: Path) -> None:
    site = site_copy(tmp_path, "ot_sessions.yaml", edited("ot_sessions.yaml", "minimum_minutes: 45", "minimum_minutes: 30").replace(
        "codes:\n", 'codes:\n  - {system: "urn:oid:1.2.840.114350.1.13.99.2.7.2.696580", code: "OT-GRP", display: "Local OT group"}\n', 1))
    (site / "rules.yaml").write_text(edited("rules.yaml", "      ot_only: {severity: warning", "      ot_only: {severity: error"))
    (site / "payers").mkdir()
    (site / "payers" / "aetna.yaml").write_text(edited("payers/aetna.yaml", "PHP: {accepts: null", "PHP: {accepts: true"))
    lines = diff_tables(site)
    assert "minimum_minutes: 45 -> 30" in lines
    assert "OT session code urn:oid:1.2.840.114350.1.13.99.2.7.2.696580|OT-GRP: added" in lines
    assert "rule OT-ONLY-DAY ot_only: severity warning -> error" in lines
    assert any(line.startswith("payer aetna PHP: ") for line in lines)
    assert diff_tables(DEFAULT_MAPPINGS_DIR) == []


def _values(rules: RuleSet) -> dict[str, Any]:
    return {"minimum": rules.day_minimum, "higher": rules.day_higher, "iop": rules.iop_start, "revenue": rules.revenue_default}


def test_billing_facts_come_from_the_tables(tmp_path: Path, ruleset: RuleSet) -> None:
    assert _values(ruleset) == {"minimum": 3, "higher": 4, "iop": "2024-01-01", "revenue": "0430"}
    site = site_copy(tmp_path, "services.yaml", edited("services.yaml", "day_tiers: {minimum: 3, higher: 4}", "day_tiers: {minimum: 2, higher: 3}"))
    r = php_day()
    d = decision_of(r, load_ruleset(site))
    assert any(f.rule == "DAY-SERVICES" and "tier 3+" in f.message for f in d.findings)
