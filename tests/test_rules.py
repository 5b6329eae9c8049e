"""Each rule both ways: the clean PHP day passes it, one changed fact fails it."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

import adapter.case
from adapter.case import Performer, build_cases
from adapter.decision import Decision
from adapter.ingest import Index
from adapter.rules import RULES
from adapter.ruleset import RuleSet

from .factories import CPT, HCPCS, NUCC, claim_line, decision_of, index_of, php_day


def findings(decision: Decision, rule: str) -> list[tuple[str, str]]:
    return [(f.severity, f.subject) for f in decision.findings if f.rule == rule]


def test_catalog_and_code_agree(ruleset: RuleSet) -> None:
    assert [r.id for r in ruleset.rules] == list(RULES)


def test_clean_day_bills_one_unit_and_passes_every_rule(ruleset: RuleSet) -> None:
    d = decision_of(php_day(), ruleset)
    assert d.outcome == "bill"
    assert d.program == "PHP" and d.payer == "medicare"
    assert [(l.code, l.units, l.service_date, l.revenue_code, l.procedures) for l in d.lines] == [
        ("G0129", 1, "2025-03-04", "0430", ("Procedure/s1",))
    ]
    assert set(d.rules_passed) == set(RULES)
    assert [(f.rule, f.severity) for f in d.findings] == [("DAY-SERVICES", "info")]
    assert d.missing_data == ()


# -- PROGRAM -------------------------------------------------------------------------------------

def test_program_error_when_claim_and_nothing_marks_a_program(ruleset: RuleSet) -> None:
    r = php_day()
    del r["encounter"]["serviceType"]
    r["claim"]["supportingInfo"].pop()  # condition code 41
    d = decision_of(r, ruleset)
    assert findings(d, "PROGRAM") == [("error", "Claim/cl1")]
    assert d.outcome == "do-not-bill" and d.lines == () and "program" in d.missing_data


def test_program_review_without_claim(ruleset: RuleSet) -> None:
    r = php_day()
    del r["encounter"]["serviceType"]
    del r["claim"]
    d = decision_of(r, ruleset)
    assert findings(d, "PROGRAM") == [("review", "Encounter/e1")]
    assert d.outcome == "review"


def test_program_from_claim_condition_code_alone(ruleset: RuleSet) -> None:
    r = php_day()
    del r["encounter"]["serviceType"]
    d = decision_of(r, ruleset)
    assert d.program == "PHP" and findings(d, "PROGRAM") == []


def test_program_from_episode_of_care_local_code(ruleset: RuleSet) -> None:
    r = php_day()
    del r["encounter"]["serviceType"]
    r["claim"]["supportingInfo"].pop()
    r["episode"] = {
        "resourceType": "EpisodeOfCare", "id": "eoc1", "status": "active", "patient": {"reference": "Patient/p1"},
        "type": [{"coding": [{"system": "https://www.nubc.org/CodeSystem/RevenueCodes", "code": "0905"}]}],
    }
    r["encounter"]["episodeOfCare"] = [{"reference": "EpisodeOfCare/eoc1"}]
    d = decision_of(r, ruleset)
    assert d.program == "IOP"


# -- IOP-DATE ------------------------------------------------------------------------------------

def _make_iop(r: dict[str, Any]) -> None:
    r["encounter"]["serviceType"]["coding"][0]["code"] = "92"
    r["claim"]["supportingInfo"][1]["code"]["coding"][0]["code"] = "92"


def test_iop_on_or_after_2024_passes(ruleset: RuleSet) -> None:
    r = php_day()
    _make_iop(r)
    d = decision_of(r, ruleset)
    assert d.program == "IOP" and findings(d, "IOP-DATE") == [] and d.outcome == "bill"


def test_iop_before_2024_is_an_error(ruleset: RuleSet) -> None:
    r = php_day()
    _make_iop(r)
    r["session"]["performedPeriod"] = {"start": "2023-12-29T09:00:00-05:00", "end": "2023-12-29T10:00:00-05:00"}
    d = decision_of(r, ruleset)
    assert findings(d, "IOP-DATE") == [("error", "Encounter/e1")]
    assert d.outcome == "do-not-bill"


# -- SESSION-LENGTH / SESSION-TIMES ----------------------------------------------------------------

def test_short_session_is_not_counted_and_none_qualifying_is_an_error(ruleset: RuleSet) -> None:
    r = php_day()
    r["session"]["performedPeriod"]["end"] = "2025-03-04T09:44:59-05:00"
    d = decision_of(r, ruleset)
    assert findings(d, "SESSION-LENGTH") == [("warning", "Procedure/s1"), ("error", "Encounter/e1")]
    assert d.outcome == "do-not-bill"


def test_exactly_45_minutes_counts_and_two_sessions_make_two_units(ruleset: RuleSet) -> None:
    r = php_day()
    r["session"]["performedPeriod"]["end"] = "2025-03-04T09:45:00-05:00"
    second = dict(r["session"], id="s2", performedPeriod={"start": "2025-03-04T13:00:00-05:00", "end": "2025-03-04T14:00:00-05:00"})
    r["session2"] = second
    d = decision_of(r, ruleset)
    assert findings(d, "SESSION-LENGTH") == []
    assert [(l.units, l.procedures) for l in d.lines] == [(2, ("Procedure/s1", "Procedure/s2"))]


def test_session_without_end_is_review_and_not_counted(ruleset: RuleSet) -> None:
    r = php_day()
    del r["session"]["performedPeriod"]["end"]
    d = decision_of(r, ruleset)
    assert findings(d, "SESSION-TIMES") == [("review", "Procedure/s1")]
    assert findings(d, "SESSION-LENGTH") == []  # unknown length is not "too short"
    assert d.outcome == "review" and d.lines == ()
    assert "session_times:Procedure/s1" in d.missing_data


def test_date_only_performed_is_review(ruleset: RuleSet) -> None:
    r = php_day()
    del r["session"]["performedPeriod"]
    r["session"]["performedDateTime"] = "2025-03-04"
    d = decision_of(r, ruleset)
    assert findings(d, "SESSION-TIMES") == [("review", "Procedure/s1")]


# -- PERFORMER -----------------------------------------------------------------------------------

def _qualify(practitioner: dict[str, Any], code: str) -> None:
    practitioner["qualification"] = [{"code": {"coding": [{"system": NUCC, "code": code}]}}]


def test_ota_with_supervising_ot_passes(ruleset: RuleSet) -> None:
    r = php_day()
    r["ota"] = {"resourceType": "Practitioner", "id": "ota1"}
    _qualify(r["ota"], "224Z00000X")
    r["session"]["performer"].insert(0, {"actor": {"reference": "Practitioner/ota1"}})
    assert findings(decision_of(r, ruleset), "PERFORMER") == []


def test_ota_alone_is_review(ruleset: RuleSet) -> None:
    r = php_day()
    _qualify(r["ot"], "224Z00000X")
    d = decision_of(r, ruleset)
    assert findings(d, "PERFORMER") == [("review", "Procedure/s1")] and d.outcome == "review"


def test_other_discipline_is_an_error(ruleset: RuleSet) -> None:
    r = php_day()
    _qualify(r["ot"], "225100000X")  # physical therapist
    d = decision_of(r, ruleset)
    assert findings(d, "PERFORMER") == [("error", "Procedure/s1")] and d.outcome == "do-not-bill"


def test_unknown_performer_is_review(ruleset: RuleSet) -> None:
    r = php_day()
    del r["ot"]["qualification"]
    d = decision_of(r, ruleset)
    assert findings(d, "PERFORMER") == [("review", "Procedure/s1")]
    assert "performer_qualification:Procedure/s1" in d.missing_data


def test_a_shared_practitioner_is_read_once_a_run_and_again_under_other_tables(ruleset: RuleSet) -> None:
    # A replay decides each group of patients over the shared resources (Index.over): what a
    # therapist is, read from its Practitioner and the tables, is kept on the shared entry.
    r = php_day()
    shared = index_of([r.pop("ot"), r.pop("cms"), r.pop("hospital")])

    def performer(rules: RuleSet) -> Performer:
        group = Index.over(shared)
        for entry in index_of(r).by_key.values():
            group.add(entry)
        (case,) = build_cases(group, rules)
        return case.sessions[0].performers[0]

    first, again = performer(ruleset), performer(ruleset)
    assert first.discipline == "OT" and again is first
    # Tables that read the taxonomy otherwise are not answered from what the first ones read.
    other = dataclasses.replace(ruleset, ot_prefixes=("225A",))
    assert performer(other).discipline == "other"
    assert performer(ruleset).discipline == "OT"


def test_a_payer_organization_contained_in_the_coverage_names_the_payer(ruleset: RuleSet) -> None:
    r = php_day()
    cms = r.pop("cms")
    r["coverage"]["contained"] = [{**cms, "id": "payer"}]
    r["coverage"]["payor"] = [{"reference": "#payer"}]
    del r["coverage"]["type"]  # the payer's name alone says which policy
    assert decision_of(r, ruleset).payer == "medicare"
    r["coverage"]["contained"][0]["name"] = "Acme Health Plan"
    assert decision_of(r, ruleset).payer == "unknown"


def test_a_payer_policy_is_the_tables_answer_whatever_tables_asked_before(ruleset: RuleSet) -> None:
    assert decision_of(php_day(), ruleset).payer == "medicare"
    assert decision_of(php_day(), dataclasses.replace(ruleset, payers=())).payer == "unknown"
    assert decision_of(php_day(), ruleset).payer == "medicare"


@pytest.mark.parametrize("bad", [{"system": NUCC, "code": "225X00000X"}, [{"system": {"url": NUCC}, "code": "225X00000X"}]])
def test_a_malformed_coding_is_read_as_none_not_a_crash(ruleset: RuleSet, bad: object) -> None:
    # `coding` must be an array of Codings with a string system; anything else tells nothing.
    r = php_day()
    r["ot"]["qualification"][0]["code"]["coding"] = bad
    assert findings(decision_of(r, ruleset), "PERFORMER") == [("review", "Procedure/s1")]


def test_a_reference_that_is_not_a_string_refers_to_nothing(ruleset: RuleSet) -> None:
    r = php_day()
    extra = {**r["session"], "id": "s2", "encounter": {"reference": {"id": "e1"}}}
    r["extra"] = extra
    d = decision_of(r, ruleset)
    assert [line.code for line in d.lines].count("G0129") == 1, "the session of no encounter is not billed"


def test_practitioner_role_specialty_counts(ruleset: RuleSet) -> None:
    r = php_day()
    del r["ot"]["qualification"]
    r["role"] = {
        "resourceType": "PractitionerRole", "id": "role1", "practitioner": {"reference": "Practitioner/ot1"},
        "specialty": [{"coding": [{"system": NUCC, "code": "225XM0800X"}]}],
    }
    r["session"]["performer"] = [{"actor": {"reference": "PractitionerRole/role1"}}]
    assert findings(decision_of(r, ruleset), "PERFORMER") == []


# -- REMOTE --------------------------------------------------------------------------------------

def test_virtual_encounter_is_an_error(ruleset: RuleSet) -> None:
    r = php_day()
    r["encounter"]["class"]["code"] = "VR"
    d = decision_of(r, ruleset)
    assert findings(d, "REMOTE") == [("error", "Encounter/e1")]


# -- DIAGNOSIS -----------------------------------------------------------------------------------

def test_non_mental_principal_diagnosis_is_an_error(ruleset: RuleSet) -> None:
    r = php_day()
    r["condition"]["code"]["coding"][0]["code"] = "M54.50"
    assert findings(decision_of(r, ruleset), "DIAGNOSIS") == [("error", "Claim/cl1")]


def test_missing_diagnosis_is_review(ruleset: RuleSet) -> None:
    r = php_day()
    del r["claim"]["diagnosis"]
    d = decision_of(r, ruleset)
    assert findings(d, "DIAGNOSIS") == [("review", "Claim/cl1")] and "principal_diagnosis" in d.missing_data


def test_encounter_rank_1_diagnosis_is_used_without_claim_diagnosis(ruleset: RuleSet) -> None:
    r = php_day()
    del r["claim"]["diagnosis"]
    r["encounter"]["diagnosis"] = [{"condition": {"reference": "Condition/dx1"}, "rank": 1}]
    assert findings(decision_of(r, ruleset), "DIAGNOSIS") == []


# -- BILL-TYPE -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tob,severity", [("0121", "error"), ("0141", "error"), ("0111", "error"), ("0871", "error"), ("Dummy", "review")])
def test_wrong_bill_type(ruleset: RuleSet, tob: str, severity: str) -> None:
    r = php_day()
    r["claim"]["supportingInfo"][0]["code"]["coding"][0]["code"] = tob
    assert findings(decision_of(r, ruleset), "BILL-TYPE") == [(severity, "Claim/cl1")]


@pytest.mark.parametrize("tob", ["0131", "0761", "0851"])
def test_php_bill_types_pass(ruleset: RuleSet, tob: str) -> None:
    r = php_day()
    r["claim"]["supportingInfo"][0]["code"]["coding"][0]["code"] = tob
    assert findings(decision_of(r, ruleset), "BILL-TYPE") == []


def test_iop_allows_fqhc_and_otp(ruleset: RuleSet) -> None:
    for tob in ("0771", "0711", "0871"):
        r = php_day()
        _make_iop(r)
        r["claim"]["supportingInfo"][0]["code"]["coding"][0]["code"] = tob
        assert findings(decision_of(r, ruleset), "BILL-TYPE") == [], tob


def test_absent_bill_type_is_review_and_subtype_is_read(ruleset: RuleSet) -> None:
    r = php_day()
    del r["claim"]["supportingInfo"][0]
    d = decision_of(r, ruleset)
    assert findings(d, "BILL-TYPE") == [("review", "Claim/cl1")] and "type_of_bill" in d.missing_data
    r["claim"]["subType"] = {"coding": [{"system": "https://www.cms.gov/codes/billtype", "code": "131"}]}
    assert findings(decision_of(r, ruleset), "BILL-TYPE") == []


# -- CONDITION-CODE ------------------------------------------------------------------------------

def test_claim_contradicting_encounter_is_review(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["supportingInfo"][1]["code"]["coding"][0]["code"] = "92"
    d = decision_of(r, ruleset)
    assert d.program == "PHP"
    assert findings(d, "CONDITION-CODE") == [("review", "Claim/cl1")]


def test_absent_condition_code_is_info(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["supportingInfo"].pop()
    d = decision_of(r, ruleset)
    assert findings(d, "CONDITION-CODE") == [("info", "Claim/cl1")] and d.outcome == "bill"
    assert "CONDITION-CODE" in d.rules_passed


# -- REVENUE-CODE / CLAIM-LINES ------------------------------------------------------------------

def test_g0129_line_with_wrong_revenue_is_warned_and_corrected(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["item"].append(claim_line(3, "G0129", revenue="0900"))
    d = decision_of(r, ruleset)
    assert findings(d, "REVENUE-CODE") == [("warning", "Claim/cl1#item[2]")]
    assert d.lines[0].revenue_code == "0430"


def test_valid_043x_and_modifiers_are_kept(ruleset: RuleSet) -> None:
    r = php_day()
    line = claim_line(3, "G0129", revenue="0431")
    line["modifier"] = [{"coding": [{"system": HCPCS, "code": "PO"}]}]
    r["claim"]["item"].append(line)
    d = decision_of(r, ruleset)
    assert findings(d, "REVENUE-CODE") == [] and findings(d, "CLAIM-LINES") == []
    assert (d.lines[0].revenue_code, d.lines[0].modifiers) == ("0431", ("PO",))


def test_ehr_line_with_wrong_units_or_no_session_is_flagged(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["item"].append(claim_line(3, "G0129", revenue="0430", qty=2))
    r["claim"]["item"].append(claim_line(4, "G0129", revenue="0430", date="2025-03-05"))
    d = decision_of(r, ruleset)
    assert findings(d, "CLAIM-LINES") == [("warning", "Claim/cl1#item[2]"), ("warning", "Claim/cl1#item[3]")]


def test_unknown_modifier_extension_is_review(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["item"][0]["modifierExtension"] = [{"url": "http://example.org/infoChanged", "valueCode": "changed"}]
    assert findings(decision_of(r, ruleset), "CLAIM-LINES") == [("review", "Claim/cl1#item[0]")]


# -- DAY-SERVICES / OT-ONLY-DAY ------------------------------------------------------------------

def test_day_tiers(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["item"].append(claim_line(3, "90853", system=CPT, revenue="0915"))
    d = decision_of(r, ruleset)
    assert findings(d, "DAY-SERVICES") == [("info", "Encounter/e1")]
    assert "tier 4+" in next(f.message for f in d.findings if f.rule == "DAY-SERVICES")


def test_fewer_than_three_services_is_warning(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["item"].pop()
    d = decision_of(r, ruleset)
    assert findings(d, "DAY-SERVICES") == [("warning", "Encounter/e1")] and d.outcome == "bill"


def test_ot_and_activity_only_day_is_warning(ruleset: RuleSet) -> None:
    r = php_day()
    r["claim"]["item"] = [claim_line(1, "G0176", revenue="0904"), claim_line(2, "G0176", revenue="0904")]
    d = decision_of(r, ruleset)
    assert findings(d, "OT-ONLY-DAY") == [("warning", "Encounter/e1")]
    assert findings(d, "DAY-SERVICES") == [("info", "Encounter/e1")]


# -- PAYER ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,key", [("Aetna Better Health", "aetna"), ("Cigna Healthcare", "cigna"), ("UnitedHealthcare", "uhc")])
def test_payers_without_policy_data_are_review(ruleset: RuleSet, name: str, key: str) -> None:
    r = php_day()
    r["cms"]["name"] = name
    r["coverage"]["type"]["coding"][0]["code"] = "5"  # private health insurance
    d = decision_of(r, ruleset)
    assert d.payer == key
    assert findings(d, "PAYER") == [("review", "Coverage/cov1")]
    assert "data not available" in next(f.message for f in d.findings if f.rule == "PAYER")


def test_bcbs_nc_accepts_php_refuses_iop(ruleset: RuleSet) -> None:
    r = php_day()
    r["cms"]["name"] = "Blue Cross and Blue Shield of North Carolina"
    r["cms"]["address"] = [{"city": "Durham", "state": "NC"}]
    r["coverage"]["type"]["coding"][0]["code"] = "62"
    d = decision_of(r, ruleset)
    assert d.payer == "bcbs-nc" and findings(d, "PAYER") == []
    _make_iop(r)
    d = decision_of(r, ruleset)
    assert findings(d, "PAYER") == [("error", "Coverage/cov1")] and d.outcome == "do-not-bill"


def test_bcbs_nc_is_matched_by_its_identifier_alone(ruleset: RuleSet) -> None:
    r = php_day()
    r["cms"]["name"] = "BCBS"
    r["cms"]["identifier"] = [{"system": "http://www.naic.org/company-code", "value": "54631"}]
    assert decision_of(r, ruleset).payer == "bcbs-nc"


@pytest.mark.parametrize(
    "name,state",
    [
        ("Blue Cross Blue Shield of North Dakota", "ND"),
        ("Blue Cross Blue Shield of Massachusetts", "MA"),
        ("Blue Cross and Blue Shield of North Carolina", None),  # no state: the plan is not identified
    ],
)
def test_any_other_blue_plan_has_no_policy(ruleset: RuleSet, name: str, state: str | None) -> None:
    r = php_day()
    r["cms"]["name"] = name
    if state:
        r["cms"]["address"] = [{"state": state}]
    r["coverage"]["type"]["coding"][0]["code"] = "6"
    d = decision_of(r, ruleset)
    assert d.payer == "bcbs" and d.outcome == "review"
    assert findings(d, "PAYER") == [("review", "Coverage/cov1")]
    assert "data not available" in next(f.message for f in d.findings if f.rule == "PAYER")


@pytest.mark.parametrize(
    "name,sopt",
    [
        ("Humana Gold Plus H1036-236", "111"),
        ("Aetna Medicare", "112"),  # never Aetna's commercial policy
        ("UnitedHealthcare Medicare Advantage Choice", None),
        ("Centers for Medicare & Medicaid Services", "14"),  # a dual-eligible plan is managed care
    ],
)
def test_medicare_advantage_is_not_medicare_fee_for_service(ruleset: RuleSet, name: str, sopt: str | None) -> None:
    r = php_day()
    r["cms"]["name"] = name
    if sopt:
        r["coverage"]["type"]["coding"][0]["code"] = sopt
    else:
        del r["coverage"]["type"]
    d = decision_of(r, ruleset)
    assert d.payer == "medicare-advantage" and d.outcome == "review"
    assert findings(d, "PAYER") == [("review", "Coverage/cov1")]


def test_unknown_payer_is_review(ruleset: RuleSet) -> None:
    r = php_day()
    r["coverage"]["type"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-selfpay", "code": "pay"}]}
    r["coverage"]["payor"] = [{"reference": "Patient/p1"}]
    d = decision_of(r, ruleset)
    assert d.payer == "unknown" and findings(d, "PAYER") == [("review", "Coverage/cov1")]


def test_coverage_found_through_patient_when_claim_has_none(ruleset: RuleSet) -> None:
    r = php_day()
    del r["claim"]
    d = decision_of(r, ruleset)
    assert d.payer == "medicare"


# -- DOCUMENTATION -------------------------------------------------------------------------------

def test_missing_documentation_is_warned_element_by_element(ruleset: RuleSet) -> None:
    r = php_day()
    del r["evaluation"], r["goal"], r["coordination"]
    del r["session"]["note"], r["session"]["outcome"]
    d = decision_of(r, ruleset)
    assert findings(d, "DOCUMENTATION") == [("warning", "Encounter/e1")]
    assert set(d.missing_data) == {"ot_evaluation", "measurable_goals", "coordination_notes", "skilled_activities", "progress"}
    assert d.outcome == "bill"


# -- SERVICE-DATE, SESSION-OVERLAP, SESSION-STATUS ------------------------------------------------

def _utc_evening(r: dict[str, dict[str, Any]]) -> None:
    # 19:15-20:10 in New York on March 4th, stored in UTC: the next UTC day.
    r["session"]["performedPeriod"] = {"start": "2025-03-05T00:15:00Z", "end": "2025-03-05T01:10:00Z"}
    r["encounter"]["period"] = {"start": "2025-03-04T22:00:00Z", "end": "2025-03-05T02:00:00Z"}


def test_a_utc_time_with_no_zone_to_read_it_in_is_review(ruleset: RuleSet) -> None:
    r = php_day()
    _utc_evening(r)
    d = decision_of(r, ruleset)
    assert findings(d, "SERVICE-DATE") == [("review", "Procedure/s1")] and "time_zone" in d.missing_data


def test_a_utc_time_is_dated_in_the_site_time_zone(ruleset: RuleSet) -> None:
    r = php_day()
    _utc_evening(r)
    d = decision_of(r, dataclasses.replace(ruleset, time_zone="America/New_York"))
    assert [line.service_date for line in d.lines] == ["2025-03-04"]
    assert findings(d, "SERVICE-DATE") == [("info", "Procedure/s1")]


def test_a_long_running_service_reads_times_right_with_its_memo_of_them_bounded(ruleset: RuleSet) -> None:
    # The sidecar runs for weeks: the times it has read are kept (they recur case after case),
    # in a memo that empties when full instead of growing, and reads the same after it has.
    site = dataclasses.replace(ruleset, time_zone="America/New_York")
    r = php_day()
    _utc_evening(r)
    before = decision_of(r, site)
    for minute in range(adapter.case._MAX_DATETIMES + 10):
        adapter.case._read_datetime(f"2024-01-{1 + minute // 1440:02d}T{minute // 60 % 24:02d}:{minute % 60:02d}:00Z")
    assert len(adapter.case._DATETIMES) <= adapter.case._MAX_DATETIMES
    assert decision_of(r, site) == before and [line.service_date for line in before.lines] == ["2025-03-04"]


def test_a_utc_time_is_dated_in_the_offset_of_its_encounter(ruleset: RuleSet) -> None:
    r = php_day()
    r["session"]["performedPeriod"] = {"start": "2025-03-05T00:15:00Z", "end": "2025-03-05T01:10:00Z"}
    r["encounter"]["period"] = {"start": "2025-03-04T17:00:00-05:00"}
    assert [line.service_date for line in decision_of(r, ruleset).lines] == ["2025-03-04"]


def test_a_midday_utc_time_has_one_date_across_the_united_states(ruleset: RuleSet) -> None:
    r = php_day()
    r["session"]["performedPeriod"] = {"start": "2025-03-04T15:00:00Z", "end": "2025-03-04T15:50:00Z"}
    r["encounter"]["period"] = {"start": "2025-03-04T13:30:00Z"}
    d = decision_of(r, ruleset)
    assert findings(d, "SERVICE-DATE") == [] and [line.service_date for line in d.lines] == ["2025-03-04"]


def test_the_same_session_recorded_twice_counts_once(ruleset: RuleSet) -> None:
    r = php_day()
    r["charge"] = copy.deepcopy(r["session"]) | {"id": "s2"}
    r["charge"]["performedPeriod"] = {"start": "2025-03-04T09:05:00-05:00", "end": "2025-03-04T09:45:00-05:00"}
    d = decision_of(r, ruleset)
    assert [(line.units, line.procedures) for line in d.lines] == [(1, ("Procedure/s1",))]
    assert findings(d, "SESSION-OVERLAP") == [("warning", "Procedure/s1")]


def test_two_sessions_by_one_performer_one_after_the_other_count_twice(ruleset: RuleSet) -> None:
    r = php_day()
    r["second"] = copy.deepcopy(r["session"]) | {"id": "s2"}
    r["second"]["performedPeriod"] = {"start": "2025-03-04T09:50:00-05:00", "end": "2025-03-04T10:40:00-05:00"}
    d = decision_of(r, ruleset)
    assert [line.units for line in d.lines] == [2] and findings(d, "SESSION-OVERLAP") == []


@pytest.mark.parametrize("status,outcome", [("in-progress", "review"), ("on-hold", "review"), ("unknown", "review"), ("stopped", "review")])
def test_only_completed_sessions_count(ruleset: RuleSet, status: str, outcome: str) -> None:
    r = php_day()
    r["session"]["status"] = status
    d = decision_of(r, ruleset)
    assert d.outcome == outcome and d.lines == () and findings(d, "SESSION-STATUS") == [("review", "Procedure/s1")]
    assert findings(d, "SESSION-LENGTH") == []


def test_every_code_system_is_known_by_its_oid_too(ruleset: RuleSet) -> None:
    # THO assigns no OID to these (NUBC type of bill, condition codes; CARIN BB): see systems.yaml.
    without_oid = {"bill_type", "condition_code", "carin_supporting_info"}
    for key in set(ruleset.canonical_systems) - without_oid:
        assert any(uri.startswith("urn:oid:") and k == key for uri, k in ruleset.system_keys.items()), key


# -- INPUT --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "role,element,value",
    [
        ("encounter", "status", "done"),
        ("encounter", "period", {"start": "yesterday"}),
        ("coverage", "status", "in force"),
        ("coverage", "period", {"start": "2024-13-01"}),
    ],
)
def test_an_invalid_value_the_rules_read_is_never_billed(ruleset: RuleSet, role: str, element: str, value: Any) -> None:
    r = php_day()
    r[role][element] = value
    d = decision_of(r, ruleset)
    subject = {"encounter": "Encounter/e1", "coverage": "Coverage/cov1"}[role]
    assert d.outcome != "bill" and findings(d, "INPUT") == [("review", subject)]


def test_an_invalid_claim_line_date_is_an_input_error_in_the_run(ruleset: RuleSet) -> None:
    from adapter.ingest import Entry, Index
    from adapter.pipeline import evaluate

    r = php_day()
    r["claim"]["item"][0]["servicedDate"] = "03/04/2025"
    index = Index()
    for resource in r.values():
        index.add(Entry(resource, "day.json"))
    run = evaluate(index, ruleset)
    [error] = [e for e in run.errors if type(e).__name__ == "InvalidElement"]
    assert (error.resource, error.element, error.value) == ("Claim/cl1", "Claim.item[0].servicedDate", "03/04/2025")
    assert run.decisions[0].outcome == "review"
