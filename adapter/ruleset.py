"""The rule tables in `mappings/`, checked and loaded once into plain, immutable data.

Code never hard-codes a billing fact: the codes, value sets, thresholds, severities, payer
policies and rule sources live in YAML beside their sources (adapter/tables.py is their schema),
and this module turns them into lookups the pure rules use.

A site's copy of the tables may hold only what it changes: a table file it does not have, a
top-level key it leaves out, or a rule it does not list comes from the bundled tables, so a copy
made for an earlier release still loads and a rule is never dropped in silence.
`g0129 rules check` lists every problem of a copy, `g0129 rules diff` what it changes.
"""

from __future__ import annotations

import hashlib
import string
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from . import tables as t
from .errors import MappingError

__all__ = [
    "DEFAULT_MAPPINGS_DIR",
    "DocEvidence",
    "DocElement",
    "PayerPolicy",
    "RuleInfo",
    "RuleSet",
    "check_tables",
    "diff_tables",
    "load_ruleset",
]

# The bundled tables ship inside the package, so a wheel or `pip install .` has them wherever it
# runs; a site points G0129_MAPPINGS_DIR (or --mappings) at its own copy.
DEFAULT_MAPPINGS_DIR = Path(str(resources.files("adapter") / "mappings"))
# payer_policy keeps at most this many answers: the payers of a health system, with room to spare.
_MAX_POLICIES: Final = 4096

Code = tuple[str, str]  # (system key or full URI, code)


@dataclass(frozen=True, slots=True)
class RuleInfo:
    id: str
    checks: str  # with the tables' parameters filled in
    when_violated: str  # made from `severities`
    source: str
    status: str
    severities: dict[str, str]  # finding kind -> error | review | warning | info


@dataclass(frozen=True, slots=True)
class PayerPolicy:
    key: str
    name: str
    market: str  # the line of business the policy was written for (markets.yaml)
    sopt_codes: frozenset[str]
    names: tuple[str, ...]
    identifiers: frozenset[str]
    states: frozenset[str]  # with names: the plan's state(s); empty = the name alone identifies it
    # program -> (accepts: True | False | None for unknown, source, status)
    programs: dict[str, tuple[bool | None, str, str]]


@dataclass(frozen=True, slots=True)
class DocEvidence:
    kind: str  # "session" | "resource" | "performers_credentialed"
    path: tuple[str, ...] = ()
    resource_type: str = ""
    codes: frozenset[Code] = frozenset()
    link: str = "patient"


@dataclass(frozen=True, slots=True)
class DocElement:
    key: str
    label: str
    evidence: tuple[DocEvidence, ...]


@dataclass(frozen=True, slots=True)
class RuleSet:
    version: str
    rules: tuple[RuleInfo, ...]
    # URI -> system key, for every alias in systems.yaml
    system_keys: dict[str, str]
    # system key -> the URI we write
    canonical_systems: dict[str, str]
    claim_condition_codes: dict[str, str]
    program_codings: dict[Code, str]
    ot_codes: frozenset[Code]
    counted_session_statuses: frozenset[str]
    review_session_statuses: frozenset[str]
    excluded_session_statuses: frozenset[str]
    minimum_minutes: int
    iop_start: str  # ISO date
    remote_classes: frozenset[Code]
    billed_code: Code  # (system key, code) of the line we bill: hcpcs G0129
    billed_display: str
    revenue_default: str
    revenue_prefixes: tuple[str, ...]
    diagnosis_system: str
    mental_health_ranges: tuple[tuple[str, str], ...]
    day_minimum: int
    day_higher: int
    ot_only_kinds: frozenset[str]
    performer_system: str
    ot_prefixes: tuple[str, ...]
    ota_prefixes: tuple[str, ...]
    bill_types_allowed: dict[str, frozenset[str]]
    bill_types_never: frozenset[str]
    services: dict[Code, str]  # code -> kind (ot | activity | other)
    payers: tuple[PayerPolicy, ...]
    sopt_markets: dict[str, str]  # SOPT code prefix -> market
    documentation: tuple[DocElement, ...]
    time_zone: str | None  # the site's IANA zone (site.yaml)
    possible_time_zones: tuple[str, ...]
    source_dir: Path = field(default=DEFAULT_MAPPINGS_DIR)
    # payer_policy's answers: the same few payers come back on Coverage after Coverage, in every
    # group of a replay, and the answer depends on the tables alone.
    _policies: dict[tuple[frozenset[str], tuple[str, ...], frozenset[str], frozenset[str]], PayerPolicy | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def system_key(self, uri: str | None) -> str | None:
        """The short key of a code system URI, or the URI itself for a site-local system."""
        if not uri:
            return None
        return self.system_keys.get(uri, uri)

    def system_uri(self, key: str) -> str:
        return self.canonical_systems.get(key, key)

    def market_of(self, sopt_code: str) -> str | None:
        """The line of business a Source of Payment Typology code names (longest prefix)."""
        for n in range(len(sopt_code), 0, -1):
            market = self.sopt_markets.get(sopt_code[:n])
            if market:
                return market
        return None

    def payer_policy(
        self, sopt: frozenset[str], lowered: tuple[str, ...], identifiers: frozenset[str], states: frozenset[str]
    ) -> PayerPolicy | None:
        """The payer policy of a Coverage: its type's Source of Payment Typology codes (`sopt`),
        its payers' names (lower case), identifiers and states."""
        memo = (sopt, lowered, identifiers, states)
        if memo in self._policies:
            return self._policies[memo]
        markets = {m for m in (self.market_of(code) for code in sopt) if m}
        # A policy belongs to one plan (g0129-rules.md §13): matched by the payer's identifier,
        # else by name and state, else by name, else by the Coverage's type; among equals the
        # most specific name wins ("medicare advantage" over "medicare"). A Coverage typed as
        # another line of business (Medicare Advantage) never takes a commercial policy.
        best: tuple[int, int, PayerPolicy | None] = (0, 0, None)
        for policy in self.payers:
            if markets and policy.market not in markets:
                continue
            needle = max((n for n in policy.names if any(n in name for name in lowered)), key=len, default="")
            score = 0
            if identifiers & policy.identifiers:
                score = 4
            elif needle and policy.states:
                score = 3 if states & policy.states else 0
            elif needle:
                score = 2
            elif sopt & policy.sopt_codes:
                score = 1
            if (score, len(needle)) > best[:2] and score:
                best = (score, len(needle), policy)
        if len(self._policies) >= _MAX_POLICIES:  # a system with thousands of payer spellings
            self._policies.clear()
        self._policies[memo] = best[2]
        return best[2]

    def rule(self, rule_id: str) -> RuleInfo:
        for info in self.rules:
            if info.id == rule_id:
                return info
        raise KeyError(rule_id)

    def severity(self, rule_id: str, kind: str) -> str:
        """The severity the tables give a kind of finding of a rule."""
        return self.rule(rule_id).severities[kind]

    def is_mental_health(self, code: str) -> bool:
        bare = code.replace(".", "").upper()
        return any(start <= bare[: len(start)] and bare[: len(end)] <= end for start, end in self.mental_health_ranges)


# -- reading a tables directory, with the bundled tables beneath it ----------------------------


# libyaml's parser when PyYAML was built with it (its wheels are): the same safe loading at a
# tenth of the pure-Python parser's cost, which every command pays at start.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _raw(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            return yaml.load(fh, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise t.TableProblem(path, [f"not valid YAML ({exc})"]) from None
    except OSError as exc:
        raise t.TableProblem(path, [f"cannot be read ({exc.strerror})"]) from None


def _overlay(bundled: Any, site: Any, name: str) -> Any:
    """The site's table over the bundled one: top-level keys, and for rules.yaml rule by rule."""
    if not isinstance(bundled, dict) or not isinstance(site, dict):
        return site
    merged = {**bundled, **site}
    if name == "rules.yaml" and isinstance(site.get("rules"), list) and isinstance(bundled.get("rules"), list):
        theirs = {r.get("id"): r for r in site["rules"] if isinstance(r, dict)}
        rules = [{**r, **theirs.pop(r.get("id"))} if r.get("id") in theirs else r for r in bundled["rules"]]
        rules += [r for r in site["rules"] if not isinstance(r, dict) or r.get("id") in theirs]
        merged["rules"] = rules
    return merged


class _Reader:
    """Reads each table of `directory` over the bundled one, collecting every problem."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.problems: list[str] = []
        self.notes: list[str] = []  # what a site copy takes from the bundled tables

    def table(self, name: str, schema: type[Any]) -> Any:
        site_path = self.directory / name
        bundled_path = DEFAULT_MAPPINGS_DIR / name
        try:
            bundled = _raw(bundled_path) if bundled_path.is_file() else None
            if site_path.is_file():
                raw = _overlay(bundled, _raw(site_path), name) if site_path != bundled_path else bundled
                where = site_path
            elif bundled is not None:
                if self.directory.resolve() != DEFAULT_MAPPINGS_DIR.resolve():
                    self.notes.append(f"{site_path}: not in this copy; the bundled table applies")
                raw, where = bundled, bundled_path
            else:
                raise t.TableProblem(site_path, ["table not found"])
            return t.validate_table(raw, schema, where)
        except t.TableProblem as exc:
            self.problems.extend(exc.problems)
            return None

    def payers(self) -> list[t.PayerTable]:
        files = {p.name: p for p in sorted((DEFAULT_MAPPINGS_DIR / "payers").glob("*.yaml"))}
        files.update({p.name: p for p in sorted((self.directory / "payers").glob("*.yaml"))})
        out = []
        for name in sorted(files):
            try:
                out.append(t.validate_table(_raw(files[name]), t.PayerTable, files[name]))
            except t.TableProblem as exc:
                self.problems.extend(exc.problems)
        keys = [p.key for p in out]
        for key in sorted({k for k in keys if keys.count(k) > 1}):
            self.problems.append(f"{self.directory / 'payers'}: payer key {key!r} is used by more than one file")
        return out


def _digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for base in (DEFAULT_MAPPINGS_DIR, directory):
        for path in sorted(base.rglob("*.yaml")):
            digest.update(path.relative_to(base).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def _codes(entries: list[t.CodeEntry], keys: dict[str, str]) -> list[Code]:
    return [(keys.get(e.system, e.system), e.code) for e in entries]


def _build(directory: Path) -> tuple[RuleSet | None, list[str], list[str]]:
    """(the RuleSet, or None when a table is unusable; every problem; notes)."""
    reader = _Reader(directory)
    if not any(directory.rglob("*.yaml")):
        # A copy may leave tables out, but one with none at all is a wrong path, not a choice.
        return None, [f"{directory}: no rule tables found (*.yaml)"], []
    systems = reader.table("systems.yaml", t.SystemsTable)
    rules_doc = reader.table("rules.yaml", t.RulesTable)
    programs = reader.table("programs.yaml", t.ProgramsTable)
    ot = reader.table("ot_sessions.yaml", t.OtSessionsTable)
    perf = reader.table("performers.yaml", t.PerformersTable)
    bills = reader.table("bill_types.yaml", t.BillTypesTable)
    services = reader.table("services.yaml", t.ServicesTable)
    lines = reader.table("lines.yaml", t.LinesTable)
    diagnoses = reader.table("diagnoses.yaml", t.DiagnosesTable)
    documentation = reader.table("documentation.yaml", t.DocumentationTable)
    markets = reader.table("markets.yaml", t.MarketsTable)
    site = reader.table("site.yaml", t.SiteTable)
    payers = reader.payers()
    problems = reader.problems
    if problems or None in (systems, rules_doc, programs, ot, perf, bills, services, lines, diagnoses, documentation, markets, site):
        return None, problems, reader.notes

    keys: dict[str, str] = {}
    canonical: dict[str, str] = {}
    for key, uris in systems.items():
        canonical[key] = uris[0]
        for uri in uris:
            keys[uri] = key
    for key in systems:
        keys.setdefault(key, key)

    where = directory
    for zone in ([site.time_zone] if site.time_zone else []) + list(site.possible_time_zones):
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"{where / 'site.yaml'}: {zone!r} is not an IANA time zone (e.g. America/Chicago)")
    statuses = [s for group in (ot.counted_statuses, ot.review_statuses, ot.excluded_statuses) for s in group]
    for status in sorted({s for s in statuses if statuses.count(s) > 1}):
        problems.append(f"{where / 'ot_sessions.yaml'}: status {status!r} is in more than one list")
    if services.day_tiers.higher < services.day_tiers.minimum:
        problems.append(f"{where / 'services.yaml'}: day_tiers.higher is below day_tiers.minimum")
    for key in {lines.code.system, diagnoses.system, perf.system} - set(systems):
        problems.append(f"{where}: system {key!r} is not a key of systems.yaml")

    params = {
        "minimum_minutes": ot.minimum_minutes,
        "iop_start": programs.iop_start.isoformat(),
        "remote_classes": "/".join(e.code for e in programs.remote_encounter_classes),
        "revenue_default": lines.revenue_default,
        "revenue_prefixes": "/".join(f"{p}X" for p in lines.revenue_prefixes),
        "mental_health": ", ".join(f"{r.start}-{r.end}" for r in diagnoses.mental_health),
        "day_minimum": services.day_tiers.minimum,
        "day_higher": services.day_tiers.higher,
        "ot_only_kinds": " and/or ".join(services.ot_only_kinds),
        "bill_types_php": ", ".join(f"{p}X" for p in bills.allowed.get("PHP", [])),
        "bill_types_iop": ", ".join(f"{p}X" for p in bills.allowed.get("IOP", [])),
        "bill_types_never": "/".join(f"{p}X" for p in bills.never),
    }
    rules = _rules(rules_doc, params, where / "rules.yaml", problems)
    if problems:
        return None, problems, reader.notes

    doc_elements = []
    for key, element in documentation.elements.items():
        evidence = []
        for item in element.evidence:
            if isinstance(item, t.SessionEvidence):
                evidence.append(DocEvidence(kind="session", path=tuple(item.session.split("."))))
            elif isinstance(item, t.ResourceEvidence):
                evidence.append(DocEvidence("resource", (), item.resource, frozenset(_codes(item.codes, keys)), item.link))
            else:
                evidence.append(DocEvidence(kind="performers_credentialed"))
        doc_elements.append(DocElement(key=key, label=element.label, evidence=tuple(evidence)))

    billed = _codes([lines.code], keys)[0]
    ruleset = RuleSet(
        version=f"{rules_doc.version}+{_digest(directory)}",
        rules=rules,
        system_keys=keys,
        canonical_systems=canonical,
        claim_condition_codes=dict(programs.claim_condition_codes),
        program_codings={code: e.program for code, e in zip(_codes(list(programs.encounter_codings), keys), programs.encounter_codings)},
        ot_codes=frozenset(_codes(ot.codes, keys)),
        counted_session_statuses=frozenset(ot.counted_statuses),
        review_session_statuses=frozenset(ot.review_statuses),
        excluded_session_statuses=frozenset(ot.excluded_statuses),
        minimum_minutes=ot.minimum_minutes,
        iop_start=programs.iop_start.isoformat(),
        remote_classes=frozenset(_codes(programs.remote_encounter_classes, keys)),
        billed_code=billed,
        billed_display=lines.code.display or "",
        revenue_default=lines.revenue_default,
        revenue_prefixes=tuple(lines.revenue_prefixes),
        diagnosis_system=keys.get(diagnoses.system, diagnoses.system),
        mental_health_ranges=tuple((r.start.upper(), r.end.upper()) for r in diagnoses.mental_health),
        day_minimum=services.day_tiers.minimum,
        day_higher=services.day_tiers.higher,
        ot_only_kinds=frozenset(services.ot_only_kinds),
        performer_system=keys.get(perf.system, perf.system),
        ot_prefixes=tuple(perf.ot_prefixes),
        ota_prefixes=tuple(perf.ota_prefixes),
        bill_types_allowed={k: frozenset(v) for k, v in bills.allowed.items()},
        bill_types_never=frozenset(bills.never),
        services={code: e.kind for code, e in zip(_codes(list(services.codes), keys), services.codes)},
        payers=tuple(
            PayerPolicy(
                key=p.key,
                name=p.name,
                market=p.market,
                sopt_codes=frozenset(p.match.sopt_codes),
                names=tuple(n.lower() for n in p.match.names),
                identifiers=frozenset(p.match.identifiers),
                states=frozenset(st.upper() for st in p.match.states),
                programs={prog: (e.accepts, e.source, e.status) for prog, e in p.policy.items()},
            )
            for p in payers
        ),
        sopt_markets=dict(markets.sopt_prefixes),
        documentation=tuple(doc_elements),
        time_zone=site.time_zone,
        possible_time_zones=tuple(site.possible_time_zones),
        source_dir=directory,
    )
    return ruleset, problems, reader.notes


def _fill(text: str, params: dict[str, Any], where: str, problems: list[str]) -> str:
    names = {name for _, name, _, _ in string.Formatter().parse(text) if name}
    unknown = sorted(names - set(params))
    if unknown:
        problems.append(f"{where}: unknown parameter(s) {', '.join('{' + u + '}' for u in unknown)} (known: {', '.join(sorted(params))})")
        return text
    return text.format(**params)


def _rules(doc: t.RulesTable, params: dict[str, Any], path: Path, problems: list[str]) -> tuple[RuleInfo, ...]:
    # Imported here: the rules import this module for the RuleSet they read.
    from .rules import FINDING_KINDS

    ids = [r.id for r in doc.rules]
    for rule_id in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{path}: rule {rule_id} is listed more than once")
    for rule_id in [i for i in ids if i not in FINDING_KINDS]:
        problems.append(f"{path}: rule {rule_id} is not implemented (known rules: {', '.join(FINDING_KINDS)})")
    for rule_id in [i for i in FINDING_KINDS if i not in ids]:
        problems.append(f"{path}: rule {rule_id} is missing")
    out = []
    for n, rule in enumerate(doc.rules):
        where = f"{path}: rules[{n}] ({rule.id})"
        kinds = FINDING_KINDS.get(rule.id, ())
        findings = rule.findings or {}
        for kind in kinds:
            if kind not in findings:
                problems.append(f"{where}.findings.{kind}: missing (the severity of this kind of finding)")
        for kind in findings:
            if kind not in kinds:
                problems.append(f"{where}.findings.{kind}: unknown kind of finding (this rule gives: {', '.join(kinds)})")
        when = "; ".join(
            f"{f.severity} when {_fill(f.when, params, f'{where}.findings.{kind}.when', problems)}" for kind, f in findings.items()
        )
        out.append(
            RuleInfo(
                # Interned: a decision looks each rule's function up by its id (`rules.RULES`),
                # and an interned key is found by identity, not by comparing its characters.
                id=sys.intern(rule.id),
                checks=_fill(rule.checks, params, f"{where}.checks", problems),
                when_violated=when,
                source=rule.source,
                status=rule.status,
                severities={kind: f.severity for kind, f in findings.items()},
            )
        )
    return tuple(out)


def check_tables(directory: Path) -> list[str]:
    """Every problem of a tables directory (empty when it loads), one message each."""
    if not Path(directory).is_dir():
        return [f"{directory}: rule tables directory not found"]
    return _build(Path(directory))[1]


def load_ruleset(directory: Path | None = None) -> RuleSet:
    """Load the tables of `directory` over the bundled ones (default: the bundled tables).

    Raises MappingError listing every problem, each with the file and the key path.
    """
    directory = Path(directory) if directory else DEFAULT_MAPPINGS_DIR
    if not directory.is_dir():
        raise MappingError(f"{directory}: mappings directory not found")
    ruleset, problems, _ = _build(directory)
    if ruleset is None or problems:
        count = f" ({len(problems)} problems)" if len(problems) > 1 else ""
        raise MappingError(f"the rule tables in {directory} cannot be used{count}:\n  " + "\n  ".join(problems))
    return ruleset


def diff_tables(site: Path, default: Path = DEFAULT_MAPPINGS_DIR) -> list[str]:
    """What a site's tables change against the bundled ones, rule by rule and code by code."""
    mine, theirs = load_ruleset(site), load_ruleset(default)
    out: list[str] = []
    for rule in mine.rules:
        base = next((r for r in theirs.rules if r.id == rule.id), None)
        if base is None:
            out.append(f"rule {rule.id}: added")
            continue
        for kind in sorted(set(rule.severities) | set(base.severities)):
            if rule.severities.get(kind) != base.severities.get(kind):
                out.append(f"rule {rule.id} {kind}: severity {base.severities.get(kind)} -> {rule.severities.get(kind)}")
        for name in ("checks", "source", "status"):
            if getattr(rule, name) != getattr(base, name):
                out.append(f"rule {rule.id} {name}: {getattr(base, name)!r} -> {getattr(rule, name)!r}")
    scalars = (
        "minimum_minutes", "iop_start", "revenue_default", "revenue_prefixes", "mental_health_ranges", "day_minimum",
        "day_higher", "ot_only_kinds", "time_zone", "possible_time_zones", "performer_system", "ot_prefixes",
        "ota_prefixes", "billed_code",
    )
    for name in scalars:
        if getattr(mine, name) != getattr(theirs, name):
            out.append(f"{name}: {_show(getattr(theirs, name))} -> {_show(getattr(mine, name))}")
    for name, label in (
        ("ot_codes", "OT session code"),
        ("remote_classes", "remote encounter class"),
        ("counted_session_statuses", "counted session status"),
        ("review_session_statuses", "review session status"),
        ("excluded_session_statuses", "excluded session status"),
        ("bill_types_never", "type of bill never allowed"),
    ):
        out.extend(_set_diff(label, getattr(theirs, name), getattr(mine, name)))
    for program in sorted(set(mine.bill_types_allowed) | set(theirs.bill_types_allowed)):
        out.extend(_set_diff(f"{program} type of bill", theirs.bill_types_allowed.get(program, frozenset()), mine.bill_types_allowed.get(program, frozenset())))
    for name, label in (("program_codings", "program code"), ("services", "day service"), ("claim_condition_codes", "condition code")):
        out.extend(_map_diff(label, getattr(theirs, name), getattr(mine, name)))
    out.extend(_map_diff("system URI", theirs.system_keys, mine.system_keys))
    out.extend(_map_diff("market of SOPT", theirs.sopt_markets, mine.sopt_markets))
    base_payers = {p.key: p for p in theirs.payers}
    for payer in mine.payers:
        was = base_payers.pop(payer.key, None)
        if was is None:
            out.append(f"payer {payer.key}: added ({payer.name})")
        elif was != payer:
            for program in sorted(set(payer.programs) | set(was.programs)):
                if payer.programs.get(program) != was.programs.get(program):
                    out.append(f"payer {payer.key} {program}: {_show(was.programs.get(program))} -> {_show(payer.programs.get(program))}")
            for name in ("name", "market", "sopt_codes", "names", "identifiers", "states"):
                if getattr(payer, name) != getattr(was, name):
                    out.append(f"payer {payer.key} {name}: {_show(getattr(was, name))} -> {_show(getattr(payer, name))}")
    out.extend(f"payer {key}: removed" for key in sorted(base_payers))
    base_docs = {d.key: d for d in theirs.documentation}
    for element in mine.documentation:
        if element.key not in base_docs:
            out.append(f"documentation {element.key}: added")
        elif base_docs.pop(element.key) != element:
            out.append(f"documentation {element.key}: evidence changed")
    out.extend(f"documentation {key}: removed" for key in sorted(base_docs))
    return out


def _show(value: Any) -> str:
    if isinstance(value, (frozenset, set)):
        return "[" + ", ".join(sorted(map(str, value))) + "]"
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ", ".join("|".join(map(str, v)) for v in value)
    return str(value)


def _set_diff(label: str, before: frozenset[Any], after: frozenset[Any]) -> list[str]:
    return [f"{label} {_code(c)}: added" for c in sorted(after - before, key=str)] + [
        f"{label} {_code(c)}: removed" for c in sorted(before - after, key=str)
    ]


def _map_diff(label: str, before: dict[Any, Any], after: dict[Any, Any]) -> list[str]:
    out = [f"{label} {_code(k)}: added ({after[k]})" for k in sorted(after.keys() - before.keys(), key=str)]
    out += [f"{label} {_code(k)}: removed (was {before[k]})" for k in sorted(before.keys() - after.keys(), key=str)]
    out += [f"{label} {_code(k)}: {before[k]} -> {after[k]}" for k in sorted(before.keys() & after.keys(), key=str) if before[k] != after[k]]
    return out


def _code(value: Any) -> str:
    return "|".join(value) if isinstance(value, tuple) else str(value)
