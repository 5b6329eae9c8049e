"""The decision for one encounter, and its JSON form (schema/decision.schema.json)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

__all__ = ["OUTCOMES", "SEVERITIES", "Decision", "Finding", "FlaggedLine", "Line", "outcome_of"]

# Most to least severe. `info` explains, it never changes the outcome.
SEVERITIES: Final = ("error", "review", "warning", "info")
OUTCOMES: Final = ("bill", "review", "do-not-bill")


# Values as those of case.py (see the note above case.InputProblem): never assigned to, hashed
# by their fields, not frozen, and with their `__init__` written out.
@dataclass(init=False, slots=True, unsafe_hash=True)
class Finding:
    rule: str
    severity: str
    message: str
    subject: str

    def __init__(self, rule: str, severity: str, message: str, subject: str) -> None:
        self.rule = rule
        self.severity = severity
        self.message = message
        self.subject = subject

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "severity": self.severity, "message": self.message, "subject": self.subject}


@dataclass(init=False, slots=True, unsafe_hash=True)
class Line:
    code: str
    units: int
    service_date: str
    revenue_code: str
    modifiers: tuple[str, ...]
    procedures: tuple[str, ...]

    def __init__(
        self,
        code: str,
        units: int,
        service_date: str,
        revenue_code: str,
        modifiers: tuple[str, ...],
        procedures: tuple[str, ...],
    ) -> None:
        self.code = code
        self.units = units
        self.service_date = service_date
        self.revenue_code = revenue_code
        self.modifiers = modifiers
        self.procedures = procedures

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "units": self.units,
            "service_date": self.service_date,
            "revenue_code": self.revenue_code,
            "modifiers": list(self.modifiers),
            "procedures": list(self.procedures),
        }


@dataclass(slots=True, unsafe_hash=True)
class FlaggedLine:
    """A G0129 line the EHR wrote that the decision does not support: kept, and flagged."""

    sequence: int | None  # Claim.item.sequence (required in R4; the index when it is absent)
    index: int
    service_date: str | None
    reason: str  # unsupported (no qualifying session behind it) | do-not-bill

    def to_json(self) -> dict[str, Any]:
        return {"sequence": self.sequence, "service_date": self.service_date, "reason": self.reason}


def outcome_of(findings: list[Finding] | tuple[Finding, ...]) -> str:
    severities = {f.severity for f in findings}
    if "error" in severities:
        return "do-not-bill"
    if "review" in severities:
        return "review"
    return "bill"


@dataclass(init=False, slots=True, unsafe_hash=True)
class Decision:
    encounter: str
    claim: str | None
    outcome: str
    program: str | None
    payer: str
    lines: tuple[Line, ...]
    findings: tuple[Finding, ...]
    missing_data: tuple[str, ...]
    rules_passed: tuple[str, ...]
    ruleset_version: str
    flagged_lines: tuple[FlaggedLine, ...] = ()

    def __init__(
        self,
        encounter: str,
        claim: str | None,
        outcome: str,
        program: str | None,
        payer: str,
        lines: tuple[Line, ...],
        findings: tuple[Finding, ...],
        missing_data: tuple[str, ...],
        rules_passed: tuple[str, ...],
        ruleset_version: str,
        flagged_lines: tuple[FlaggedLine, ...] = (),
    ) -> None:
        self.encounter = encounter
        self.claim = claim
        self.outcome = outcome
        self.program = program
        self.payer = payer
        self.lines = lines
        self.findings = findings
        self.missing_data = missing_data
        self.rules_passed = rules_passed
        self.ruleset_version = ruleset_version
        self.flagged_lines = flagged_lines

    @property
    def rule_ids(self) -> tuple[str, ...]:
        """Rules with a finding, in catalog order, each once."""
        return tuple(dict.fromkeys(f.rule for f in self.findings))

    def to_json(self) -> dict[str, Any]:
        return {
            "encounter": self.encounter,
            "claim": self.claim,
            "outcome": self.outcome,
            "program": self.program,
            "payer": self.payer,
            "lines": [line.to_json() for line in self.lines],
            "findings": [f.to_json() for f in self.findings],
            "missing_data": list(self.missing_data),
            "rules_passed": list(self.rules_passed),
            "ruleset_version": self.ruleset_version,
            "flagged_lines": [f.to_json() for f in self.flagged_lines],
        }
