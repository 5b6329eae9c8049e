"""The review Task of a Claim: a person's work item for the decisions that ended in `review`.

Pure (no I/O): `review_task` makes the Task from the decisions written onto a Claim and from
whether the Claim the server held before was under review; `adapter/writeback.py` writes it in
the same transaction as the Claim, under a conditional update on its identifier, so a Claim has
one Task whatever the number of re-decisions. The Task follows our profile
(`conformance/StructureDefinition-g0129-review-task.json`):

- a Claim with a `review` decision: `status` requested, `focus` the Claim, `for` its Patient,
  `encounter` the first encounter under review, `reasonCode` the rules whose findings asked for
  review, `input` the findings, the missing data and the proposed lines, `owner` the billing team
  (`G0129_REVIEW_OWNER`);
- a Claim that was under review and no longer is: the same Task `cancelled`, its `statusReason`
  saying what the new decisions are (nobody needs to look any more), unless a person answered it:
  then it stays as that person left it (completed, with the answer the decisions now follow);
- otherwise no Task.
"""

from __future__ import annotations

import csv
import io

from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import quote

from .annotate import draft_claim_id
from .case import Case
from .decision import Decision, Line
from .pipeline import AnnotatedClaim
from .vocabulary import (
    ANNOTATED_TAG,
    DECISION_EXTENSION,
    REVIEW_TASK_PROFILE,
    RULE_SYSTEM,
    TASK_CODE_SYSTEM,
    TASK_CODES,
    TASK_IDENTIFIER_SYSTEM,
    draft_identifier,
)

__all__ = ["REVIEW_COLUMNS", "review_csv", "review_rows", "review_task", "task_condition", "task_key", "under_review"]

Resource = dict[str, Any]

_DISPLAY: Final = {code: display for code, display, _ in TASK_CODES}


def _coding(code: str) -> Resource:
    return {"coding": [{"system": TASK_CODE_SYSTEM, "code": code, "display": _DISPLAY[code]}]}


def under_review(claim: Resource | None) -> bool:
    """Whether a Claim carries a decision of ours whose outcome is `review`."""
    for ext in (claim or {}).get("extension") or ():
        if isinstance(ext, dict) and ext.get("url") == DECISION_EXTENSION:
            if any(isinstance(p, dict) and p.get("url") == "outcome" and p.get("valueCode") == "review" for p in ext.get("extension") or ()):
                return True
    return False


def task_key(claim_key: str, claim: Resource) -> str:
    """The Task identifier's value: the Claim's key, and for a draft of ours the key it has
    before the server names it (`Claim/g0129-<encounter id>`), the same on every run."""
    draft = draft_identifier(claim)
    return f"Claim/{draft_claim_id(draft)}" if draft else claim_key


def task_condition(key: str) -> str:
    """The conditional-update URL of the Task of `task_key` (`Task?identifier=system|key`)."""
    return f"Task?identifier={quote(f'{TASK_IDENTIFIER_SYSTEM}|{key}', safe=':/|')}"


def _line_text(line: Line, encounter: str) -> str:
    modifiers = f", modifiers {' '.join(line.modifiers)}" if line.modifiers else ""
    return f"{line.code} x {line.units} on {line.service_date}, revenue code {line.revenue_code}{modifiers} ({encounter})"


def _inputs(decisions: Sequence[Decision], cases: Sequence[Case]) -> list[Resource]:
    inputs: list[Resource] = []
    dates = {c.encounter: c.encounter_date for c in cases}
    names = {c.encounter: c.payer_name for c in cases}
    for d in decisions:
        # What a worklist sorts and filters by first: the date and the payer of each day.
        if dates.get(d.encounter):
            inputs.append({"type": _coding("service-date"), "valueDate": dates[d.encounter]})
        name = names.get(d.encounter)
        inputs.append({"type": _coding("payer"), "valueString": f"{d.payer} ({name})" if name else d.payer})
        inputs += [
            {"type": _coding("finding"), "valueString": f"{f.rule} ({f.severity}): {f.message} [{f.subject}]"} for f in d.findings
        ]
        inputs += [{"type": _coding("missing-data"), "valueString": f"{m} ({d.encounter})"} for m in d.missing_data]
        inputs += [{"type": _coding("proposed-line"), "valueString": _line_text(line, d.encounter)} for line in d.lines]
    return inputs


def review_task(
    key: str,
    focus: str,
    claim: Resource,
    decisions: Sequence[Decision],
    cases: Sequence[Case],
    was_under_review: bool,
    answered: frozenset[str] | None,
    owner: str | None,
    now: str,
) -> Resource | None:
    """The Task (identifier `key`, see `task_key`) to write beside an annotated Claim `claim`,
    referred to as `focus` (`Claim/<id>`, or the fullUrl of a draft created in the same
    transaction), or None when the Claim neither is nor was under review, or no longer is because
    a person answered its Task (`answered`: the rules that Task asked about, None when nobody
    answered). A question the answer did not cover asks again, with the answered ones (an
    approval settles only the whole question it was given). `now` is the Task's lastModified."""
    review = [d for d in decisions if d.outcome == "review"]
    if not review and (answered is not None or not was_under_review):
        return None
    patient = claim.get("patient")
    task: Resource = {
        "resourceType": "Task",
        "meta": {"profile": [REVIEW_TASK_PROFILE], "tag": [dict(ANNOTATED_TAG)]},
        "identifier": [{"system": TASK_IDENTIFIER_SYSTEM, "value": key}],
        "status": "requested" if review else "cancelled",
    }
    if not review:
        outcomes = "; ".join(f"{d.outcome} for {d.encounter}" for d in decisions)
        task["statusReason"] = {"text": f"A later decision no longer needs review: {outcomes} (ruleset {decisions[0].ruleset_version})."}
    task |= {
        "intent": "order",
        "priority": "routine",
        "code": _coding("review"),
        "description": f"Review the G0129 decision for {key}: approve to bill the proposed lines, reject not to bill G0129.",
        "focus": {"reference": focus},
        "for": dict(patient) if isinstance(patient, dict) else {"display": "Patient not recorded"},
    }
    if review:
        task["encounter"] = {"reference": review[0].encounter}
    task["lastModified"] = now
    if owner:
        task["owner"] = {"reference": owner}
    if review:
        asked = answered or frozenset()
        rules = dict.fromkeys(f.rule for d in review for f in d.findings if f.severity == "review" or f.rule in asked)
        task["reasonCode"] = {
            "coding": [{"system": RULE_SYSTEM, "code": rule} for rule in rules],
            "text": f"Review asked by {', '.join(rules)}",
        }
        task["input"] = _inputs(review, cases)
    return task


# review.csv: one row per decision under review, the columns a biller sorts and filters by first.
REVIEW_COLUMNS: Final = (
    "service_date",
    "payer",
    "payer_name",
    "program",
    "rules",
    "missing_data",
    "proposed_units",
    "claim",
    "encounter",
    "patient",
    "findings",
)


def review_csv(claims: Sequence[AnnotatedClaim], header: bool = False) -> bytes:
    """`review_rows` as lines of review.csv (RFC 4180, UTF-8), after the header line if asked:
    a replay writes the header once, then each partition's rows as it is decided."""
    rows = review_rows(claims)
    if not rows and not header:
        return b""  # most groups of a replay: no writer made for them
    # csv.writer, not DictWriter: a replay makes one writer a group, and DictWriter's (pure
    # Python) set-up and per-row checks were most of review.csv's cost.
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\r\n")
    if header:
        writer.writerow(REVIEW_COLUMNS)
    writer.writerows([row[column] for column in REVIEW_COLUMNS] for row in rows)
    return text.getvalue().encode("utf-8")


def review_rows(claims: Sequence[AnnotatedClaim]) -> list[dict[str, str]]:
    """The review items of a run (each decision whose outcome is `review`), as rows of
    REVIEW_COLUMNS, by service date, payer, Claim and encounter. `rules` are the rules that asked
    for review (space-separated), `findings` their messages (` | `), `missing_data` `; `."""
    rows = []
    for claim in claims:
        for decision, case in zip(claim.decisions, claim.cases):
            if decision.outcome != "review":
                continue
            asking = [f for f in decision.findings if f.severity == "review"]
            dates = sorted(line.service_date for line in decision.lines)
            rows.append(
                {
                    "service_date": case.encounter_date or (dates[0] if dates else ""),
                    "payer": decision.payer,
                    "payer_name": case.payer_name or "",
                    "program": decision.program or "",
                    "rules": " ".join(dict.fromkeys(f.rule for f in asking)),
                    "missing_data": "; ".join(decision.missing_data),
                    "proposed_units": str(sum(line.units for line in decision.lines)),
                    "claim": claim.key,
                    "encounter": decision.encounter,
                    "patient": case.patient or "",
                    "findings": " | ".join(f.message for f in asking),
                }
            )
    return sorted(rows, key=lambda r: (r["service_date"], r["payer"], r["claim"], r["encounter"]))
