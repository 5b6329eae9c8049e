"""G0129 FHIR billing adapter: decides how OT in PHP/IOP is billed and annotates the Claim."""

from .annotate import annotate, draft_claim
from .case import Case, build_cases
from .decision import Decision, Finding, Line
from .ingest import Index, load_bytes, load_paths
from .pipeline import AnnotatedClaim, RunResult, evaluate
from .rules import decide
from .ruleset import RuleSet, load_ruleset

__all__ = [
    "AnnotatedClaim",
    "Case",
    "Decision",
    "Finding",
    "Index",
    "Line",
    "RunResult",
    "RuleSet",
    "annotate",
    "build_cases",
    "decide",
    "draft_claim",
    "evaluate",
    "load_bytes",
    "load_paths",
    "load_ruleset",
]
