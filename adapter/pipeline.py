"""ingest -> Case -> rules -> Decision -> annotate, for everything loaded in one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .annotate import annotate, draft_claim
from .case import build_cases
from .decision import Decision
from .errors import InputError, InvalidResource
from .fhir_models import validate
from .ingest import Index
from .rules import decide
from .ruleset import RuleSet

__all__ = ["AnnotatedClaim", "RunResult", "evaluate"]


@dataclass(slots=True)
class AnnotatedClaim:
    """A Claim with the decisions of every encounter it bills written onto it."""

    key: str  # "Claim/<id>"
    source: str
    original: dict[str, Any] | None  # None for a draft we made
    resource: dict[str, Any]
    decisions: list[Decision] = field(default_factory=list)


@dataclass(slots=True)
class RunResult:
    decisions: list[Decision]
    claims: list[AnnotatedClaim]  # valid ones, in order of first decision
    errors: list[InputError]


def evaluate(index: Index, rules: RuleSet, validate_claims: bool = True) -> RunResult:
    """Decide every case in the index and annotate each Claim once with all its decisions.

    A PHP claim often bills several days (encounters): the decisions are applied to it one after
    the other, which is safe because annotation is per date and per encounter.
    """
    decisions: list[Decision] = []
    claims: dict[str, AnnotatedClaim] = {}
    for case in build_cases(index, rules):
        decision = decide(case, rules)
        decisions.append(decision)
        if case.claim is not None:
            key, source, original = case.claim.key, case.claim.source, case.claim.resource
        else:
            original = None
            draft = draft_claim(case, rules)
            key, source = f"Claim/{draft['id']}", case.encounter
        current = claims.get(key)
        if current is None:
            base = original if original is not None else draft
            current = claims[key] = AnnotatedClaim(key, source, original, base)
        current.resource = annotate(current.resource, decision, rules)
        current.decisions.append(decision)
    errors: list[InputError] = []
    valid = []
    for claim in claims.values():
        if validate_claims:
            try:
                validate(claim.resource, f"{claim.source} ({claim.key})")
            except InvalidResource as exc:
                errors.append(exc)
                continue
        valid.append(claim)
    return RunResult(decisions, valid, errors)
