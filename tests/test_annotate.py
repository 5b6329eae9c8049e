from __future__ import annotations

import copy

from adapter.annotate import annotate, draft_claim, draft_claim_id
from adapter.vocabulary import ANNOTATED_TAG, DECISION_EXTENSION, LINE_FLAG_EXTENSION
from adapter.fhir_models import validate
from adapter.rules import decide
from adapter.ruleset import RuleSet

from .factories import CC, claim_line, case_of, php_day


def _annotated(resources: dict, ruleset: RuleSet) -> tuple[dict, dict]:
    case = case_of(resources, ruleset)
    decision = decide(case, ruleset)
    base = case.claim.resource if case.claim else draft_claim(case, ruleset)
    return base, annotate(base, decision, ruleset)


def test_annotation_keeps_everything_and_adds_the_line(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["extension"] = [{"url": "http://vendor.example/ext", "valueString": "kept"}]
    before, after = _annotated(r, ruleset)
    assert before == r["claim"], "the input is not mutated"
    assert after["item"][:2] == before["item"]
    new = after["item"][2]
    assert new["productOrService"]["coding"][0]["code"] == "G0129"
    assert (new["sequence"], new["servicedDate"], new["quantity"], new["revenue"]["coding"][0]["code"]) == (3, "2025-03-04", {"value": 1}, "0430")
    assert "modifier" not in new
    assert after["extension"][0] == {"url": "http://vendor.example/ext", "valueString": "kept"}
    ext = next(e for e in after["extension"] if e["url"] == DECISION_EXTENSION)
    assert {"url": "outcome", "valueCode": "bill"} in ext["extension"]
    assert ANNOTATED_TAG in after["meta"]["tag"]
    validate(after)


def test_annotation_is_idempotent(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["supportingInfo"].pop()  # the condition code gets added
    case = case_of(r, ruleset)
    decision = decide(case, ruleset)
    once = annotate(case.claim.resource, decision, ruleset)
    assert annotate(once, decision, ruleset) == once
    assert sum(1 for i in once["supportingInfo"] if i["code"]["coding"][0]["system"] == CC) == 1


def test_ehr_line_is_corrected_in_place_never_deleted(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["item"].append(claim_line(3, "G0129", revenue="0900", qty=3))
    r["claim"]["item"].append(claim_line(4, "G0129", revenue="0430", date="2025-03-07"))
    _, after = _annotated(r, ruleset)
    assert len(after["item"]) == 4
    fixed, unsupported = after["item"][2], after["item"][3]
    assert fixed["revenue"]["coding"][0]["code"] == "0430" and fixed["quantity"]["value"] == 1
    flag = unsupported.pop("extension")
    assert unsupported == r["claim"]["item"][3], "kept digit for digit, only flagged"
    assert flag[0]["url"] == LINE_FLAG_EXTENSION and flag[0]["extension"][0] == {"url": "reason", "valueCode": "unsupported"}


def test_type_of_bill_in_subtype_is_copied_to_supporting_info(ruleset: RuleSet) -> None:
    r = php_day()
    del r["claim"]["supportingInfo"][0]
    r["claim"]["subType"] = {"coding": [{"system": "https://www.cms.gov/codes/billtype", "code": "131"}]}
    _, after = _annotated(r, ruleset)
    tob = [i for i in after["supportingInfo"] if i["category"]["coding"][0]["code"] == "typeofbill"]
    assert tob and tob[0]["code"]["coding"][0]["code"] == "131"


def test_do_not_bill_adds_no_line_but_records_the_decision(ruleset: RuleSet) -> None:
    r = php_day()
    r["encounter"]["class"]["code"] = "VR"
    before, after = _annotated(r, ruleset)
    assert after["item"] == before["item"]
    ext = next(e for e in after["extension"] if e["url"] == DECISION_EXTENSION)
    assert {"url": "outcome", "valueCode": "do-not-bill"} in ext["extension"]
    assert {"url": "rule", "valueCode": "REMOTE"} in ext["extension"]


def test_draft_claim_is_deterministic_and_valid(ruleset: RuleSet) -> None:
    r = php_day()
    del r["claim"]
    _, first = _annotated(copy.deepcopy(r), ruleset)
    _, second = _annotated(copy.deepcopy(r), ruleset)
    assert first == second
    assert first["id"] == draft_claim_id("Encounter/e1") == "g0129-e1"
    assert first["status"] == "draft" and first["identifier"][0]["value"] == "Encounter/e1"
    assert first["patient"] == {"reference": "Patient/p1"} and first["insurance"][0]["coverage"] == {"reference": "Coverage/cov1"}
    # No type of bill yet: review. The proposed line waits in the decision extension, not in item.
    assert "item" not in first
    ext = next(e for e in first["extension"] if e["url"] == DECISION_EXTENSION)
    proposed = [p for p in ext["extension"] if p["url"] == "proposedLine"]
    assert [next(x["valueCoding"]["code"] for x in p["extension"] if x["url"] == "code") for p in proposed] == ["G0129"]
    validate(first)


def test_draft_claim_id_for_long_ids_is_still_valid() -> None:
    long_id = "Encounter/" + "x" * 70
    assert draft_claim_id(long_id) == draft_claim_id(long_id)
    assert len(draft_claim_id(long_id)) <= 64


def test_a_line_we_added_is_taken_back_when_a_later_decision_drops_it(ruleset: RuleSet) -> None:
    r = php_day()
    case = case_of(r, ruleset)
    billed = annotate(case.claim.resource, decide(case, ruleset), ruleset)
    assert len(billed["item"]) == 3
    # The diagnosis is corrected to a non-mental one: the day is no longer billable.
    r["claim"] = billed
    r["condition"]["code"]["coding"][0]["code"] = "M54.50"
    case = case_of(r, ruleset)
    decision = decide(case, ruleset)
    assert decision.outcome == "do-not-bill"
    withdrawn = annotate(billed, decision, ruleset)
    assert withdrawn["item"] == php_day()["claim"]["item"], "our G0129 line is gone, the EHR's lines stay"
    assert annotate(withdrawn, decision, ruleset) == withdrawn


def test_our_own_line_follows_the_decision_without_claim_line_warnings(ruleset: RuleSet) -> None:
    r = php_day()
    case = case_of(r, ruleset)
    r["claim"] = annotate(case.claim.resource, decide(case, ruleset), ruleset)
    r["session2"] = dict(r["session"], id="s2", performedPeriod={"start": "2025-03-04T13:00:00-05:00", "end": "2025-03-04T14:00:00-05:00"})
    case = case_of(r, ruleset)
    decision = decide(case, ruleset)
    assert not [f for f in decision.findings if f.rule in ("CLAIM-LINES", "REVENUE-CODE")]
    after = annotate(r["claim"], decision, ruleset)
    assert [i["quantity"]["value"] for i in after["item"] if i["productOrService"]["coding"][0]["code"] == "G0129"] == [2]


def test_annotate_changes_nothing_it_was_given(ruleset: RuleSet) -> None:
    """annotate shares with the Claim it is given every part it leaves alone, so each change it
    makes (a corrected line, a flag, a supportingInfo, a tag) must land on a copy: neither the
    Claim as read nor an annotated Claim annotated again may change."""
    r = php_day()
    r["claim"]["supportingInfo"].pop()  # the condition code gets added
    r["claim"]["item"].append(claim_line(3, "G0129", revenue="0900", qty=3))  # corrected
    r["claim"]["item"].append(claim_line(4, "G0129", revenue="0430", date="2025-03-07"))  # flagged
    r["claim"]["meta"] = {"versionId": "2", "tag": [{"system": "http://vendor.example/tags", "code": "x"}]}
    case = case_of(r, ruleset)
    given = copy.deepcopy(case.claim.resource)
    once = annotate(case.claim.resource, decide(case, ruleset), ruleset)
    assert case.claim.resource == given
    assert once["item"][2]["revenue"] != given["item"][2]["revenue"] and "extension" in once["item"][3]
    assert len(once["supportingInfo"]) == len(given["supportingInfo"]) + 1 and len(once["meta"]["tag"]) == 2

    # The same encounter decided again, now do-not-bill: its line flags and decision change.
    r["encounter"]["class"]["code"] = "VR"
    annotated = copy.deepcopy(once)
    again = annotate(once, decide(case_of(r, ruleset), ruleset), ruleset)
    assert once == annotated
    assert again != once and {"url": "reason", "valueCode": "do-not-bill"} in again["item"][2]["extension"][-1]["extension"]
