"""ingest -> Case -> rules -> Decision -> annotate, for everything loaded in one run."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .annotate import annotate, draft_claim
from .case import Case, build_cases
from .decision import Decision
from .errors import InputError, InvalidResource
from .fhir_models import validate
from .ingest import Index
from .rules import decide
from .ruleset import RuleSet

__all__ = ["Outcome", "evaluate"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One encounter's result: the case read, the decision, and the annotated Claim (None when
    the Claim could not be made valid, in which case `error` says why)."""

    case: Case
    decision: Decision
    claim: dict[str, Any] | None
    error: InputError | None = None


def evaluate(index: Index, rules: RuleSet, validate_claims: bool = True) -> Iterator[Outcome]:
    """Decide every case in the index, in encounter order of arrival."""
    for case in build_cases(index, rules):
        decision = decide(case, rules)
        base = case.claim.resource if case.claim is not None else draft_claim(case, rules)
        claim = annotate(base, decision, rules)
        if validate_claims:
            source = f"{case.claim.source} ({case.claim.key})" if case.claim else case.encounter
            try:
                validate(claim, source)
            except InvalidResource as exc:
                yield Outcome(case, decision, None, exc)
                continue
        yield Outcome(case, decision, claim)
