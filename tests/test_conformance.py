"""The published definitions (conformance/) are exactly what the code and the rule tables make,
and they describe what the adapter writes (HAPI validates against them in tests/test_e2e_hapi.py)."""

from __future__ import annotations

import orjson

from adapter.decision import OUTCOMES
from adapter.definitions import definitions
from adapter.ruleset import RuleSet
from adapter.vocabulary import (
    ADDED_EXTENSION,
    CORRECTED_EXTENSION,
    DECISION_EXTENSION,
    LINE_EXTENSION,
    LINE_FLAG_EXTENSION,
    OUTCOME_SYSTEM,
    REVIEW_TASK_PROFILE,
    RULE_SYSTEM,
    TAG_SYSTEM,
    TASK_CODE_SYSTEM,
)

from .conftest import ROOT
from .conformance import DIRECTORY, render


def test_the_committed_definitions_are_made_from_the_tables() -> None:
    committed = {p.name: p.read_bytes() for p in DIRECTORY.glob("*.json")}
    assert committed == render(), "run: python3 -m tests.conformance"


def test_conformance_is_the_packaged_directory() -> None:
    published = ROOT / "conformance"
    assert published.is_symlink() and published.resolve() == DIRECTORY
    assert '"conformance/*.json"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def _by_url(ruleset: RuleSet) -> dict[str, dict[str, object]]:
    return {str(r["url"]): r for r in definitions(ruleset).values()}


def test_every_url_the_code_writes_is_defined(ruleset: RuleSet) -> None:
    urls = _by_url(ruleset)
    for url in (DECISION_EXTENSION, LINE_EXTENSION, LINE_FLAG_EXTENSION, ADDED_EXTENSION, CORRECTED_EXTENSION, REVIEW_TASK_PROFILE):
        assert urls[url]["resourceType"] == "StructureDefinition"
    for system in (RULE_SYSTEM, OUTCOME_SYSTEM, TAG_SYSTEM, TASK_CODE_SYSTEM):
        assert urls[system]["resourceType"] == "CodeSystem"
        assert urls[str(urls[system]["valueSet"])]["resourceType"] == "ValueSet"


def _codes(resource: dict[str, object]) -> list[str]:
    concepts = resource["concept"]
    assert isinstance(concepts, list)
    return [c["code"] for c in concepts]


def test_the_rule_and_outcome_codes_are_the_catalogs(ruleset: RuleSet) -> None:
    urls = _by_url(ruleset)
    assert _codes(urls[RULE_SYSTEM]) == [r.id for r in ruleset.rules]
    assert _codes(urls[OUTCOME_SYSTEM]) == list(OUTCOMES)
    assert urls[RULE_SYSTEM]["version"] == ruleset.version.split("+")[0]


def test_the_decision_extension_defines_every_part_annotate_writes(ruleset: RuleSet) -> None:
    decision = _by_url(ruleset)[DECISION_EXTENSION]
    elements = decision["differential"]["element"]  # type: ignore[index]
    slices = {e["id"].rsplit(":", 1)[1]: (e["min"], e["max"]) for e in elements if "sliceName" in e}
    assert slices == {
        "outcome": (1, "1"),
        "rule": (0, "*"),
        "rulesetVersion": (1, "1"),
        "encounter": (1, "1"),
        "proposedLine": (0, "*"),
        "code": (1, "1"),
        "units": (1, "1"),
        "serviceDate": (1, "1"),
        "revenueCode": (1, "1"),
        "modifier": (0, "*"),
        "procedure": (0, "*"),
    }
    bindings = {e["id"]: e["binding"]["valueSet"] for e in elements if "binding" in e}
    assert bindings == {
        "Extension.extension:outcome.value[x]": OUTCOME_SYSTEM.replace("CodeSystem", "ValueSet"),
        "Extension.extension:rule.value[x]": RULE_SYSTEM.replace("CodeSystem", "ValueSet"),
    }


def test_the_files_are_fhir_json_named_by_type_and_id() -> None:
    for path in DIRECTORY.glob("*.json"):
        resource = orjson.loads(path.read_bytes())
        assert path.name == f"{resource['resourceType']}-{resource['id']}.json"
        assert resource["url"].startswith("https://g0129-adapter.org/fhir/")
