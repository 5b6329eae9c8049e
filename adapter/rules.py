"""The G0129 rules: pure functions of a Case, its planned lines and the RuleSet.

Each rule has the stable id of mappings/rules.yaml and returns its findings; no finding means
the rule passed. `decide` runs them all and turns the findings into a Decision.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Final

from .case import Case, ClaimLine, Session
from .decision import Decision, Finding, FlaggedLine, Line, outcome_of
from .ruleset import RuleSet

__all__ = ["FINDING_KINDS", "RULES", "Plan", "decide", "plan_lines"]

# NUBC writes a type of bill as three digits (after its leading zero): a shape, not a billing fact.
_TOB: Final = re.compile(r"^\d{3}$")


def _found(rules: RuleSet, rule: str, kind: str, message: str, subject: str) -> Finding:
    """A finding of `kind`, with the severity the tables give it (rules.yaml `findings`)."""
    return Finding(rule, rules.severity(rule, kind), message, subject)


# Values as those of case.py (see the note above case.InputProblem): never assigned to, hashed
# by their fields, not frozen, and with their `__init__` written out.
@dataclass(init=False, slots=True, unsafe_hash=True)
class Plan:
    """What would be billed: the qualifying sessions grouped into one line per date."""

    lines: tuple[Line, ...]
    qualifying: tuple[Session, ...]
    unknown_length: tuple[Session, ...]
    pending: tuple[Session, ...]  # not (yet) counted: a status a person must look at
    # Derived once here because two rules each read them (DAY-SERVICES and OT-ONLY-DAY the
    # days, CLAIM-LINES and the flags the EHR's lines).
    days: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]  # each billed date's (kind, units), by date
    ehr_lines: tuple[tuple[ClaimLine, Line | None], ...]  # see _ehr_g0129_lines

    def __init__(
        self,
        lines: tuple[Line, ...],
        qualifying: tuple[Session, ...],
        unknown_length: tuple[Session, ...],
        pending: tuple[Session, ...],
        days: tuple[tuple[str, tuple[tuple[str, float], ...]], ...],
        ehr_lines: tuple[tuple[ClaimLine, Line | None], ...],
    ) -> None:
        self.lines = lines
        self.qualifying = qualifying
        self.unknown_length = unknown_length
        self.pending = pending
        self.days = days
        self.ehr_lines = ehr_lines


def _is_billed_code(rules: RuleSet, system: str | None, code: str | None) -> bool:
    return (system, code) == rules.billed_code


def _revenue_kept(rules: RuleSet, revenue: str | None) -> bool:
    return bool(revenue) and len(revenue or "") == 4 and (revenue or "").startswith(rules.revenue_prefixes)


def plan_lines(case: Case, rules: RuleSet) -> Plan:
    counted = tuple(s for s in case.sessions if s.counts)
    qualifying = tuple(s for s in counted if s.minutes is not None and s.minutes >= rules.minimum_minutes)
    unknown = tuple(s for s in counted if s.minutes is None)
    pending = tuple(s for s in case.sessions if s.status_class != "counted")
    by_date: dict[str, list[Session]] = defaultdict(list)
    for session in qualifying:
        if session.service_date:
            by_date[session.service_date].append(session)
    existing = {}
    for line in case.claim_lines:
        if case.owns(line) and _is_billed_code(rules, line.system, line.code) and line.service_date and line.service_date not in existing:
            existing[line.service_date] = line
    lines = []
    for date in sorted(by_date):
        current = existing.get(date)
        revenue = current.revenue if current and current.revenue and _revenue_kept(rules, current.revenue) else rules.revenue_default
        lines.append(
            Line(
                code=rules.billed_code[1],
                units=len(by_date[date]),
                service_date=date,
                revenue_code=revenue,
                # The specification's default is "00, no modifier"; keep what the EHR chose (PN/PO).
                modifiers=current.modifiers if current else (),
                procedures=tuple(s.procedure for s in by_date[date]),
            )
        )
    planned = tuple(lines)
    return Plan(planned, qualifying, unknown, pending, _day_units(case, planned), tuple(_ehr_g0129_lines(case, planned, rules)))


Rule = Callable[[Case, Plan, RuleSet, list[str]], list[Finding]]


def _input(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    # The sessions' own values are SESSION-STATUS's and SESSION-TIMES's to report.
    return [
        _found(rules, "INPUT", "invalid_value", f"{p.element} {p.message} (an input error): the encounter is not billed until it is fixed.", p.resource)
        for p in case.input_problems
        if not p.element.startswith("Procedure.")
    ]


def _program(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    if case.program:
        return []
    subject = case.claim_ref or case.encounter
    if len(case.encounter_programs) > 1 or len(case.claim_programs) > 1:
        return [_found(rules, "PROGRAM", "both_programs", "Both PHP and IOP are marked; a day belongs to one program.", subject)]
    missing.append("program")
    if case.has_claim:
        return [
            _found(
                rules, "PROGRAM", "claim_without_program",
                "The claim carries neither condition code 41 (PHP) nor 92 (IOP) and nothing marks a "
                "PHP/IOP program: G0129 is billable only inside one.",
                subject,
            )
        ]
    return [_found(rules, "PROGRAM", "no_claim_no_program", "Nothing marks a PHP or IOP program and there is no claim yet.", subject)]


def _iop_date(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    if case.program != "IOP":
        return []
    dates = {s.service_date for s in case.sessions if s.service_date}
    if not dates and case.encounter_date:
        dates = {case.encounter_date}
    early = sorted(d for d in dates if d < rules.iop_start)
    if not early:
        return []
    return [
        _found(rules, "IOP-DATE", "before_start", f"IOP service on {d}: G0129 is an IOP service only from {rules.iop_start}.", case.encounter)
        for d in early
    ]


def _session_status(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    findings = []
    for s in plan.pending:
        if s.status_class == "review":
            message = f"Session status is {s.status}: not counted until it is completed."
        else:
            message = f"Session status {s.status!r} is not a Procedure.status code (an input error): not counted."
        findings.append(_found(rules, "SESSION-STATUS", "not_completed" if s.status_class == "review" else "invalid_status", message, s.procedure))
    return findings


def _session_length(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    findings = [
        _found(
            rules, "SESSION-LENGTH", "short_session",
            f"Session lasted {s.minutes:.0f} minutes, under {rules.minimum_minutes}: not counted.",
            s.procedure,
        )
        for s in case.sessions
        if s.counts and s.minutes is not None and s.minutes < rules.minimum_minutes
    ]
    if not case.sessions:
        findings.append(_found(rules, "SESSION-LENGTH", "no_session", "No OT session is recorded for this encounter.", case.encounter))
    elif not plan.qualifying and not plan.unknown_length and not plan.pending:
        findings.append(
            _found(rules, "SESSION-LENGTH", "none_qualifies", f"No OT session lasted {rules.minimum_minutes} minutes or more.", case.encounter)
        )
    return findings


def _session_times(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    findings = []
    for s in case.sessions:
        if s.duplicate_of:
            continue
        if s.invalid_times:
            missing.append(f"session_times:{s.procedure}")
            elements = ", ".join(s.invalid_times)
            findings.append(
                _found(rules, "SESSION-TIMES", "invalid_time", f"{elements} is not a valid FHIR dateTime (an input error): the session is not counted.", s.procedure)
            )
        elif s.start is None or s.end is None:
            absent = " and ".join(n for n, v in (("start", s.start), ("end", s.end)) if v is None)
            missing.append(f"session_times:{s.procedure}")
            findings.append(
                _found(rules, "SESSION-TIMES", "missing_time", f"Session has no {absent} time: its length is unknown, so it is not counted.", s.procedure)
            )
        elif s.minutes is not None and s.minutes <= 0:
            findings.append(_found(rules, "SESSION-TIMES", "ends_before_start", "Session ends before it starts.", s.procedure))
    return findings


def _service_date(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    findings = []
    for s in case.sessions:
        if not s.counts:
            continue
        if s.date_uncertain:
            missing.append("time_zone")
            findings.append(
                _found(
                    rules, "SERVICE-DATE", "uncertain_date",
                    f"Session start {s.start} is in UTC and neither its Encounter nor the site (site.yaml time_zone) "
                    f"says where it was given: its local date may not be {s.service_date}.",
                    s.procedure,
                )
            )
        elif s.date_read_in:
            findings.append(
                _found(rules, "SERVICE-DATE", "converted", f"Session start {s.start} (UTC) read in {s.date_read_in}: service date {s.service_date}.", s.procedure)
            )
    return findings


def _session_overlap(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    return [
        _found(
            rules, "SESSION-OVERLAP", "same_session",
            f"{', '.join((s.procedure,) + s.taken_as_one)} record the same session (same performer, overlapping times): "
            f"counted once, as {s.procedure}.",
            s.procedure,
        )
        for s in case.sessions
        if s.taken_as_one
    ]


def _performer(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    findings = []
    for s in plan.qualifying + plan.unknown_length:
        disciplines = [p.discipline for p in s.performers]
        if "OT" in disciplines:
            continue
        if "OTA" in disciplines:
            findings.append(
                _found(rules, "PERFORMER", "ota_without_supervisor", "Furnished by an OT assistant with no supervising OT recorded on the session.", s.procedure)
            )
        elif disciplines and all(d == "other" for d in disciplines):
            taxonomies = ", ".join(sorted({p.taxonomy or "" for p in s.performers}))
            findings.append(
                _found(rules, "PERFORMER", "other_discipline", f"Furnished by another discipline (NUCC {taxonomies}), not an OT or supervised OTA.", s.procedure)
            )
        else:
            missing.append(f"performer_qualification:{s.procedure}")
            findings.append(
                _found(rules, "PERFORMER", "unknown_qualification", "The performer's qualification (OT or OTA) is not recorded.", s.procedure)
            )
    return findings


def _remote(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    if case.encounter_class and ("act_code", case.encounter_class) in rules.remote_classes:
        return [_found(rules, "REMOTE", "remote", f"Delivered remotely (Encounter.class {case.encounter_class}); PHP/IOP services are in person.", case.encounter)]
    return []


def _diagnosis(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    dx = case.diagnosis
    subject = case.claim_ref or case.encounter
    if dx is None:
        missing.append("principal_diagnosis")
        return [_found(rules, "DIAGNOSIS", "none", "No principal diagnosis is recorded.", subject)]
    if dx.system != rules.diagnosis_system:
        return [_found(rules, "DIAGNOSIS", "not_icd10cm", f"Principal diagnosis {dx.code} is not coded in ICD-10-CM.", subject)]
    if rules.is_mental_health(dx.code):
        return []
    return [
        _found(rules, "DIAGNOSIS", "not_mental_health", f"Principal diagnosis {dx.code} ({dx.source}) is not a mental/behavioral diagnosis ({', '.join(f'{a}-{b}' for a, b in rules.mental_health_ranges)}).", subject)
    ]


def _bill_type(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    subject = case.claim_ref or case.encounter
    tob = case.bill_type
    if tob is None:
        missing.append("type_of_bill")
        return [_found(rules, "BILL-TYPE", "absent", "No type of bill is recorded.", subject)]
    if not _TOB.match(tob):
        return [_found(rules, "BILL-TYPE", "invalid", f"Type of bill {tob!r} is not a valid NUBC type of bill.", subject)]
    prefix = tob[:2]
    if prefix in rules.bill_types_never:
        return [_found(rules, "BILL-TYPE", "never", f"Type of bill {tob} ({prefix}X) is never processed for PHP/IOP.", subject)]
    allowed = rules.bill_types_allowed.get(case.program or "")
    if allowed is None:  # no program told: any PHP/IOP type of bill (not worked out for every case)
        allowed = frozenset().union(*rules.bill_types_allowed.values())
    if prefix not in allowed:
        kinds = ", ".join(f"{p}X" for p in sorted(allowed))
        return [_found(rules, "BILL-TYPE", "wrong_for_program", f"Type of bill {tob} does not fit {case.program or 'PHP/IOP'} ({kinds}).", subject)]
    return []


def _condition_code(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    program = case.program
    if program is None:
        return []
    code = next(c for c, p in rules.claim_condition_codes.items() if p == program)
    if case.claim_ref is None:
        return [_found(rules, "CONDITION-CODE", "no_claim", f"No claim yet; the draft claim carries condition code {code} ({program}).", case.encounter)]
    if not case.claim_programs:
        return [_found(rules, "CONDITION-CODE", "absent", f"Condition code {code} ({program}) is absent; the annotated claim adds it.", case.claim_ref)]
    if case.claim_programs != {program}:
        said = "/".join(sorted(case.claim_programs))
        return [_found(rules, "CONDITION-CODE", "contradicts", f"The claim's condition code says {said} but the encounter is {program}.", case.claim_ref)]
    return []


def _revenue_code(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    return [
        _found(
            rules, "REVENUE-CODE", "wrong_revenue",
            f"G0129 line {line.sequence or line.index + 1} has revenue code {line.revenue or 'none'}, not "
            f"{'/'.join(p + 'X' for p in rules.revenue_prefixes)}; the annotated claim uses {rules.revenue_default}.",
            f"{case.claim_ref}#item[{line.index}]",
        )
        for line in case.claim_lines
        if case.owns(line) and not line.ours and _is_billed_code(rules, line.system, line.code) and not _revenue_kept(rules, line.revenue)
    ]


def _ehr_g0129_lines(case: Case, lines: tuple[Line, ...], rules: RuleSet) -> Iterator[tuple[ClaimLine, Line | None]]:
    """The EHR's G0129 lines of this encounter, each with the planned line it stands for (None:
    no qualifying session behind it, or a second line for a date already billed)."""
    planned = {line.service_date: line for line in lines}
    seen: set[str] = set()
    for line in case.claim_lines:
        if not case.owns(line) or line.ours or not _is_billed_code(rules, line.system, line.code):
            continue  # our own lines follow the decision, see annotate
        date = line.service_date or ""
        yield line, None if date in seen else planned.get(date)
        seen.add(date)


def _claim_lines(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    findings = [
        _found(rules, "CLAIM-LINES", "unknown_modifier_extension", "The line carries a modifierExtension the adapter does not understand.", f"{case.claim_ref}#item[{line.index}]")
        for line in case.claim_lines
        if case.owns(line) and not line.ours and line.has_modifier_extension
    ]
    for line, target in plan.ehr_lines:
        subject = f"{case.claim_ref}#item[{line.index}]"
        date = line.service_date
        if target is None:
            findings.append(
                _found(rules, "CLAIM-LINES", "unsupported_line", f"G0129 line on {date or 'no date'} has no qualifying session behind it; kept and flagged, not deleted.", subject)
            )
        elif line.quantity != target.units:
            findings.append(
                _found(rules, "CLAIM-LINES", "units_differ", f"G0129 line on {date} has {line.quantity:g} units; the qualifying sessions make {target.units}.", subject)
            )
    return findings


def _flagged_lines(case: Case, plan: Plan, outcome: str, rules: RuleSet) -> tuple[FlaggedLine, ...]:
    """The EHR's lines to flag: on a do-not-bill day all of them, on a bill day the unsupported
    ones. A review leaves Claim.item as the EHR wrote it."""
    if outcome == "review":
        return ()
    return tuple(
        FlaggedLine(line.sequence, line.index, line.service_date, "do-not-bill" if outcome == "do-not-bill" else "unsupported")
        for line, target in plan.ehr_lines
        if outcome == "do-not-bill" or target is None
    )


def _day_units(case: Case, lines: tuple[Line, ...]) -> tuple[tuple[str, tuple[tuple[str, float], ...]], ...]:
    per_day: dict[str, list[tuple[str, float]]] = {line.service_date: [("ot", float(line.units))] for line in lines}
    for service in case.services:
        if service.service_date in per_day:
            per_day[service.service_date].append((service.kind, service.units))
    return tuple((date, tuple(services)) for date, services in sorted(per_day.items()))


def _day_services(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    findings = []
    for date, services in plan.days:
        count = sum(units for _, units in services)
        if count < rules.day_minimum:
            findings.append(
                _found(rules, "DAY-SERVICES", "under_minimum", f"{count:g} PHP/IOP service(s) on {date}: fewer than {rules.day_minimum}, no per diem for the day.", case.encounter)
            )
        else:
            tier = f"{rules.day_higher}+" if count >= rules.day_higher else str(rules.day_minimum)
            findings.append(_found(rules, "DAY-SERVICES", "tier", f"{count:g} PHP/IOP services on {date}: tier {tier}.", case.encounter))
    return findings


def _ot_only_day(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    return [
        _found(rules, "OT-ONLY-DAY", "ot_only", f"Only OT and/or activity therapy on {date}: not a PHP/IOP day on its own.", case.encounter)
        for date, services in plan.days
        if all(kind in rules.ot_only_kinds for kind, _ in services)
    ]


def _coverage(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    if case.coverage is None:
        return []  # PAYER says the payer is not identified
    if case.coverage_status != "active":
        return [_found(rules, "COVERAGE", "not_active", f"The Coverage's status is {case.coverage_status or 'not recorded'}, not active.", case.coverage)]
    dates = sorted({line.service_date for line in plan.lines} or case.service_dates)
    start, end = case.coverage_period
    findings = []
    if start and dates and dates[0] < start:
        findings.append(_found(rules, "COVERAGE", "outside_period", f"The Coverage starts on {start}, after the service on {dates[0]}.", case.coverage))
    if end and dates and dates[-1] > end:
        findings.append(_found(rules, "COVERAGE", "outside_period", f"The Coverage ended on {end}, before the service on {dates[-1]}.", case.coverage))
    return findings


def _payer(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    subject = case.coverage or case.claim_ref or case.encounter
    if case.payer_policy is None:
        missing.append("payer")
        who = f"Payer {case.payer_name!r}" if case.payer_name else "The payer"
        return [_found(rules, "PAYER", "not_identified", f"{who} is not identified: payer policy data not available.", subject)]
    if case.program is None:
        return []
    accepts, source, _ = case.payer_policy.programs.get(case.program, (None, "", ""))
    name = case.payer_policy.name
    if accepts is None:
        return [_found(rules, "PAYER", "no_policy", f"{name}: payer policy data not available for G0129 in {case.program}.", subject)]
    if accepts is False:
        return [_found(rules, "PAYER", "refuses", f"{name} does not accept G0129 for {case.program} ({source}).", subject)]
    return []


def _documentation(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    absent = [el for el in rules.documentation if not case.documentation.get(el.key)]
    if not absent:
        return []
    missing.extend(el.key for el in absent)
    labels = ", ".join(el.label for el in absent)
    return [_found(rules, "DOCUMENTATION", "missing", f"Documentation not found: {labels}.", case.encounter)]


def _review(case: Case, plan: Plan, rules: RuleSet, missing: list[str]) -> list[Finding]:
    answer = case.review_answer
    if answer is None:
        return []
    when = f" on {answer.on}" if answer.on else ""
    task = answer.task.split("/_history/")[0]  # a subject names the resource; the Provenance its version
    if answer.answer == "approve":
        asked = f" (the questions of {', '.join(sorted(answer.rules))})" if answer.rules else ""
        return [_found(rules, "REVIEW", "approved", f"Approved by {answer.who}{when}{asked}: the proposed lines are billed.", task)]
    return [_found(rules, "REVIEW", "rejected", f"Rejected by {answer.who}{when}: G0129 is not billed.", task)]


def _settled(findings: list[Finding], case: Case) -> list[Finding]:
    """An approval settles the review findings of the rules its Task named: they stay, as
    warnings, and no longer hold the lines back. Any other rule's review still asks."""
    answer = case.review_answer
    if answer is None or answer.answer != "approve":
        return findings
    return [replace(f, severity="warning") if f.severity == "review" and f.rule in answer.rules else f for f in findings]


RULES: Final[dict[str, Rule]] = {
    "INPUT": _input,
    "PROGRAM": _program,
    "IOP-DATE": _iop_date,
    "SESSION-STATUS": _session_status,
    "SESSION-LENGTH": _session_length,
    "SESSION-TIMES": _session_times,
    "SERVICE-DATE": _service_date,
    "SESSION-OVERLAP": _session_overlap,
    "PERFORMER": _performer,
    "REMOTE": _remote,
    "DIAGNOSIS": _diagnosis,
    "BILL-TYPE": _bill_type,
    "CONDITION-CODE": _condition_code,
    "REVENUE-CODE": _revenue_code,
    "CLAIM-LINES": _claim_lines,
    "DAY-SERVICES": _day_services,
    "OT-ONLY-DAY": _ot_only_day,
    "COVERAGE": _coverage,
    "PAYER": _payer,
    "DOCUMENTATION": _documentation,
    "REVIEW": _review,
}

# The kinds of finding each rule gives; rules.yaml gives each its severity, and loading the
# tables checks the two agree (a kind missing there or unknown here is a table error).
FINDING_KINDS: Final[dict[str, tuple[str, ...]]] = {
    "INPUT": ("invalid_value",),
    "PROGRAM": ("both_programs", "claim_without_program", "no_claim_no_program"),
    "IOP-DATE": ("before_start",),
    "SESSION-STATUS": ("not_completed", "invalid_status"),
    "SESSION-LENGTH": ("short_session", "no_session", "none_qualifies"),
    "SESSION-TIMES": ("missing_time", "invalid_time", "ends_before_start"),
    "SERVICE-DATE": ("uncertain_date", "converted"),
    "SESSION-OVERLAP": ("same_session",),
    "PERFORMER": ("other_discipline", "ota_without_supervisor", "unknown_qualification"),
    "REMOTE": ("remote",),
    "DIAGNOSIS": ("not_mental_health", "none", "not_icd10cm"),
    "BILL-TYPE": ("never", "wrong_for_program", "absent", "invalid"),
    "CONDITION-CODE": ("contradicts", "absent", "no_claim"),
    "REVENUE-CODE": ("wrong_revenue",),
    "CLAIM-LINES": ("unsupported_line", "units_differ", "unknown_modifier_extension"),
    "DAY-SERVICES": ("under_minimum", "tier"),
    "OT-ONLY-DAY": ("ot_only",),
    "COVERAGE": ("not_active", "outside_period"),
    "PAYER": ("not_identified", "no_policy", "refuses"),
    "DOCUMENTATION": ("missing",),
    "REVIEW": ("approved", "rejected"),
}


def decide(case: Case, rules: RuleSet) -> Decision:
    plan = plan_lines(case, rules)
    findings: list[Finding] = []
    missing: list[str] = []
    passed = []
    for info in rules.rules:
        found = RULES[info.id](case, plan, rules, missing)
        findings += found
        if not found or all(f.severity == "info" for f in found):  # most rules find nothing
            passed.append(info.id)
    findings = _settled(findings, case)
    outcome = outcome_of(findings)
    return Decision(
        encounter=case.encounter,
        claim=case.claim_ref,
        outcome=outcome,
        program=case.program,
        payer=case.payer,
        lines=() if outcome == "do-not-bill" else plan.lines,
        findings=tuple(findings),
        missing_data=tuple(dict.fromkeys(missing)),
        rules_passed=tuple(passed),
        ruleset_version=rules.version,
        flagged_lines=_flagged_lines(case, plan, outcome, rules),
    )
