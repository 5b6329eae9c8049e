"""The one decision step: ingest -> Case -> rules -> Decision -> annotate, per Claim.

Every door calls `evaluate`: `g0129 replay` and `evaluate` on files, `POST /$evaluate` on a
request body, `replay --fhir-base` and the sidecar's worker on what they read from a FHIR
server. The unit of the result is the Claim: all the encounters a Claim bills are decided
together and written onto it at once, so a Claim billing several PHP days is written once per
change, never once per day.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from .annotate import annotate, draft_claim
from .case import Case, build_cases
from .decision import Decision
from .errors import InputError, InvalidElement, InvalidResource
from .fhir_models import validate, validate_changes
from .ingest import Index
from .rules import decide
from .ruleset import RuleSet
from .vocabulary import versioned_reference

__all__ = ["AnnotatedClaim", "RunResult", "Validation", "evaluate"]

# How the Claims we write are proven valid R4: "full" validates each whole with the R4B models;
# "changes" validates what the annotation added or changed with the models of those elements
# (the rest is the EHR's Claim, byte for byte); "none" trusts both.
Validation = Literal["full", "changes", "none"]


# `__init__` written out, as for the values of case.py (see the note above case.InputProblem).
@dataclass(init=False, slots=True)
class AnnotatedClaim:
    """A Claim with the decisions of every encounter it bills written onto it."""

    key: str  # "Claim/<id>"
    source: str  # where the Claim (for a draft: its first encounter) came from
    original: dict[str, Any] | None  # as read; None for a draft we make
    resource: dict[str, Any]
    decisions: list[Decision] = field(default_factory=list)
    cases: list[Case] = field(default_factory=list)

    def __init__(
        self,
        key: str,
        source: str,
        original: dict[str, Any] | None,
        resource: dict[str, Any],
        decisions: list[Decision] | None = None,
        cases: list[Case] | None = None,
    ) -> None:
        self.key = key
        self.source = source
        self.original = original
        self.resource = resource
        self.decisions = [] if decisions is None else decisions
        self.cases = [] if cases is None else cases

    @property
    def changed(self) -> bool:
        return self.resource != self.original

    def entities(self) -> list[str]:
        """What the decisions were made from, version-specific where the input says its version:
        the Claim as read, each Encounter, its sessions and the review Task a person answered."""
        refs = [versioned_reference(self.original)] if self.original is not None else []
        for case in self.cases:
            refs.append(versioned_reference(case.encounter_resource))
            refs.extend(versioned_reference(s.resource) for s in case.sessions)
            if case.review_answer is not None:
                refs.append(case.review_answer.task)
        return list(dict.fromkeys(refs))


@dataclass(slots=True)
class RunResult:
    decisions: list[Decision]
    claims: list[AnnotatedClaim]  # valid ones, in order of first decision
    errors: list[InputError]  # input problems met while deciding, and Claims that failed validation
    encounters_seen: int = 0  # Encounter resources looked at, in scope or not


def evaluate(
    index: Index,
    rules: RuleSet,
    validation: Validation = "full",
    encounters: Collection[str] | None = None,
) -> RunResult:
    """Decide every case in the index (or only `encounters`, as `Encounter/<id>`) and annotate
    each Claim once with the decisions of all its encounters; a Claim that fails `validation`
    is an error, never a result.

    A PHP claim often bills several days: the decisions are applied to it one after the other,
    which is safe because annotation is per date and per encounter.
    """
    decisions: list[Decision] = []
    claims: dict[str, AnnotatedClaim] = {}
    errors: list[InputError] = []
    reported: set[tuple[str, str]] = set()
    # In date order, whatever order the inputs came in (a file, a server's search): the lines
    # added to a Claim billing several days follow the days, on every path alike.
    cases = sorted(build_cases(index, rules, encounters), key=lambda c: (c.encounter_date or "", c.encounter))
    for case in cases:
        decision = decide(case, rules)
        decisions.append(decision)
        for p in case.input_problems:
            if (p.resource, p.element) not in reported:  # a Coverage two days share, reported once
                reported.add((p.resource, p.element))
                errors.append(InvalidElement(p.message, p.source, p.resource, p.element, p.value))
        if case.claim is not None:
            key, source, original = case.claim.key, case.claim.source, case.claim.resource
            base = original
        else:
            original, base = None, draft_claim(case, rules)
            key, source = f"Claim/{base['id']}", case.source
        current = claims.get(key)
        if current is None:
            current = claims[key] = AnnotatedClaim(key, source, original, base)
        current.resource = annotate(current.resource, decision, rules)
        current.decisions.append(decision)
        current.cases.append(case)
    valid = []
    for claim in claims.values():
        source = f"{claim.source} ({claim.key})"
        try:
            if validation == "changes":
                validate_changes(claim.original, claim.resource, source)
            elif validation == "full":
                validate(claim.resource, source)
        except InvalidResource as exc:
            errors.append(exc)
            continue
        valid.append(claim)
    seen = index.of_type("Encounter")
    if encounters is not None:
        seen = [e for e in seen if e.key in encounters]
    return RunResult(decisions, valid, errors, encounters_seen=len(seen))
