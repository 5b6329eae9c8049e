"""The rule tables in `mappings/`, loaded once into plain, immutable data.

Code never hard-codes a billing fact: the codes, value sets, payer policies and rule sources
live in YAML beside their sources, and this module turns them into lookups the pure rules use.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from .errors import MappingError

__all__ = [
    "DEFAULT_MAPPINGS_DIR",
    "DocEvidence",
    "DocElement",
    "PayerPolicy",
    "RuleInfo",
    "RuleSet",
    "load_ruleset",
]

# The bundled tables ship inside the package, so a wheel or `pip install .` has them wherever it
# runs; a site points G0129_MAPPINGS_DIR (or --mappings) at its own copy.
DEFAULT_MAPPINGS_DIR = Path(str(resources.files("adapter") / "mappings"))

Code = tuple[str, str]  # (system key or full URI, code)


@dataclass(frozen=True, slots=True)
class RuleInfo:
    id: str
    checks: str
    when_violated: str
    source: str
    status: str


@dataclass(frozen=True, slots=True)
class PayerPolicy:
    key: str
    name: str
    market: str  # the line of business the policy was written for (markets.yaml)
    sopt_codes: frozenset[str]
    names: tuple[str, ...]
    identifiers: frozenset[str]
    states: frozenset[str]  # with names: the plan's state(s); empty = the name alone identifies it
    # program -> (accepts: True | False | None for unknown, source)
    programs: dict[str, tuple[bool | None, str]]


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

    def rule(self, rule_id: str) -> RuleInfo:
        for info in self.rules:
            if info.id == rule_id:
                return info
        raise KeyError(rule_id)


def _read_yaml(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise MappingError(f"{path}: mapping table not found") from None
    except yaml.YAMLError as exc:
        raise MappingError(f"{path}: not valid YAML ({exc})") from None


def _require(table: Any, key: str, path: Path) -> Any:
    if not isinstance(table, dict) or key not in table:
        raise MappingError(f"{path}: missing key {key!r}")
    return table[key]


def _codes(entries: Any, path: Path, system_keys: dict[str, str]) -> list[tuple[Code, dict[str, Any]]]:
    if not isinstance(entries, list):
        raise MappingError(f"{path}: expected a list of {{system, code}} entries")
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or "system" not in entry or "code" not in entry:
            raise MappingError(f"{path}: every code entry needs 'system' and 'code': {entry!r}")
        system = str(entry["system"])
        out.append(((system_keys.get(system, system), str(entry["code"])), entry))
    return out


def _ruleset_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.yaml")):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def load_ruleset(directory: Path | None = None) -> RuleSet:
    """Load every table under `directory` (default: the tables bundled in the package)."""
    directory = Path(directory) if directory else DEFAULT_MAPPINGS_DIR
    if not directory.is_dir():
        raise MappingError(f"{directory}: mappings directory not found")

    systems_path = directory / "systems.yaml"
    systems = _read_yaml(systems_path)
    if not isinstance(systems, dict):
        raise MappingError(f"{systems_path}: expected a mapping of key -> list of URIs")
    system_keys: dict[str, str] = {}
    canonical: dict[str, str] = {}
    for key, uris in systems.items():
        if not isinstance(uris, list) or not uris:
            raise MappingError(f"{systems_path}: {key!r} needs a non-empty list of URIs")
        canonical[key] = uris[0]
        for uri in uris:
            system_keys[uri] = key
    # A key used directly in a table ("system: hcpcs") maps to itself.
    for key in systems:
        system_keys.setdefault(key, key)

    rules_path = directory / "rules.yaml"
    rules_doc = _read_yaml(rules_path)
    rules = tuple(
        RuleInfo(
            id=str(_require(r, "id", rules_path)),
            checks=str(_require(r, "checks", rules_path)),
            when_violated=str(_require(r, "when_violated", rules_path)),
            source=str(_require(r, "source", rules_path)),
            status=str(_require(r, "status", rules_path)),
        )
        for r in _require(rules_doc, "rules", rules_path)
    )
    for info in rules:
        if info.status not in ("CONFIRMED", "UNCERTAIN"):
            raise MappingError(f"{rules_path}: rule {info.id} has status {info.status!r}")

    programs_path = directory / "programs.yaml"
    programs = _read_yaml(programs_path)
    claim_cc = {str(k): str(v) for k, v in _require(programs, "claim_condition_codes", programs_path).items()}
    program_codings = {
        code: str(_require(entry, "program", programs_path))
        for code, entry in _codes(_require(programs, "encounter_codings", programs_path), programs_path, system_keys)
    }

    ot_path = directory / "ot_sessions.yaml"
    ot = _read_yaml(ot_path)
    ot_codes = frozenset(code for code, _ in _codes(_require(ot, "codes", ot_path), ot_path, system_keys))

    perf_path = directory / "performers.yaml"
    perf = _read_yaml(perf_path)

    bill_path = directory / "bill_types.yaml"
    bills = _read_yaml(bill_path)

    services_path = directory / "services.yaml"
    services_doc = _read_yaml(services_path)
    services = {
        code: str(_require(entry, "kind", services_path))
        for code, entry in _codes(_require(services_doc, "codes", services_path), services_path, system_keys)
    }

    payers = []
    for payer_path in sorted((directory / "payers").glob("*.yaml")):
        doc = _read_yaml(payer_path)
        match = _require(doc, "match", payer_path)
        policy = _require(doc, "policy", payer_path)
        payers.append(
            PayerPolicy(
                key=str(_require(doc, "key", payer_path)),
                name=str(_require(doc, "name", payer_path)),
                market=str(_require(doc, "market", payer_path)),
                sopt_codes=frozenset(str(c) for c in match.get("sopt_codes") or ()),
                names=tuple(str(n).lower() for n in match.get("names") or ()),
                identifiers=frozenset(str(i) for i in match.get("identifiers") or ()),
                states=frozenset(str(st).upper() for st in match.get("states") or ()),
                programs={
                    str(program): (entry.get("accepts"), str(entry.get("source", "")))
                    for program, entry in policy.items()
                },
            )
        )

    markets_path = directory / "markets.yaml"
    sopt_markets = {str(k): str(v) for k, v in (_require(_read_yaml(markets_path), "sopt_prefixes", markets_path) or {}).items()}

    site_path = directory / "site.yaml"
    site = _read_yaml(site_path)
    time_zone = _require(site, "time_zone", site_path)
    possible_zones = tuple(str(z) for z in _require(site, "possible_time_zones", site_path) or ())
    for zone in ([time_zone] if time_zone else []) + list(possible_zones):
        try:
            ZoneInfo(str(zone))
        except (ZoneInfoNotFoundError, ValueError):
            raise MappingError(f"{site_path}: {zone!r} is not an IANA time zone (e.g. America/Chicago)") from None

    statuses = {
        name: frozenset(str(v) for v in _require(ot, name, ot_path) or ())
        for name in ("counted_statuses", "review_statuses", "excluded_statuses")
    }

    doc_path = directory / "documentation.yaml"
    doc_table = _require(_read_yaml(doc_path), "elements", doc_path)
    elements = []
    for key, element in doc_table.items():
        evidence = []
        for item in _require(element, "evidence", doc_path):
            if "session" in item:
                evidence.append(DocEvidence(kind="session", path=tuple(str(item["session"]).split("."))))
            elif "resource" in item:
                codes = frozenset(c for c, _ in _codes(item.get("codes") or [], doc_path, system_keys))
                link = str(item.get("link", "patient"))
                if link not in ("patient", "encounter"):
                    raise MappingError(f"{doc_path}: {key}: link must be patient or encounter")
                evidence.append(DocEvidence(kind="resource", resource_type=str(item["resource"]), codes=codes, link=link))
            elif item.get("performers_credentialed"):
                evidence.append(DocEvidence(kind="performers_credentialed"))
            else:
                raise MappingError(f"{doc_path}: {key}: unknown evidence {item!r}")
        elements.append(DocElement(key=str(key), label=str(element.get("label", key)), evidence=tuple(evidence)))

    return RuleSet(
        version=f"{_require(rules_doc, 'version', rules_path)}+{_ruleset_digest(directory)}",
        rules=rules,
        system_keys=system_keys,
        canonical_systems=canonical,
        claim_condition_codes=claim_cc,
        program_codings=program_codings,
        ot_codes=ot_codes,
        counted_session_statuses=statuses["counted_statuses"],
        review_session_statuses=statuses["review_statuses"],
        excluded_session_statuses=statuses["excluded_statuses"],
        minimum_minutes=int(_require(ot, "minimum_minutes", ot_path)),
        performer_system=str(_require(perf, "system", perf_path)),
        ot_prefixes=tuple(_require(perf, "ot_prefixes", perf_path)),
        ota_prefixes=tuple(_require(perf, "ota_prefixes", perf_path)),
        bill_types_allowed={k: frozenset(v) for k, v in _require(bills, "allowed", bill_path).items()},
        bill_types_never=frozenset(_require(bills, "never", bill_path)),
        services=services,
        payers=tuple(payers),
        sopt_markets=sopt_markets,
        documentation=tuple(elements),
        time_zone=str(time_zone) if time_zone else None,
        possible_time_zones=possible_zones,
        source_dir=directory,
    )
