"""The `g0129` command.

    g0129 replay PATH... [--out DIR]     decide, write decisions/claims/errors NDJSON
    g0129 evaluate PATH...               print decisions as NDJSON, write nothing
    g0129 rules                          the rule catalog, with sources and status

Exit codes: 0 every input processed, 1 some input invalid (the rest still processed), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import orjson

from .errors import AdapterError, InputError, MappingError, UsageError
from .ingest import Index, load_paths
from .pipeline import evaluate
from .ruleset import RuleSet, load_ruleset
from .sinks import DirectorySink, error_record

__all__ = ["main"]

EXIT_OK, EXIT_INVALID_INPUT, EXIT_USAGE = 0, 1, 2


class _Progress:
    """A one-line counter on a terminal; silent when stderr is a pipe or a file."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.shown = False

    def update(self, done: int, total: int) -> None:
        if self.enabled and total >= 50 and (done % 25 == 0 or done == total):
            self.stream.write(f"\rreading files {done}/{total}")
            self.stream.flush()
            self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _load(paths: list[Path], stderr: IO[str]) -> tuple[Index, list[InputError], int]:
    progress = _Progress(stderr)
    try:
        return load_paths(paths, on_file=progress.update)
    finally:
        progress.close()


def _report_errors(errors: list[InputError], stderr: IO[str]) -> None:
    for error in errors:
        stderr.write(f"error: {error}\n")


def _replay(args: argparse.Namespace, rules: RuleSet, stdout: IO[str], stderr: IO[str]) -> int:
    index, errors, nfiles = _load(args.paths, stderr)
    result = evaluate(index, rules, validate_claims=args.validate)
    errors.extend(result.errors)
    outcomes = Counter(d.outcome for d in result.decisions)
    by_rule = Counter((f.rule, f.severity) for d in result.decisions for f in d.findings)
    with DirectorySink(args.out) as sink:
        for decision in result.decisions:
            sink.write("decisions", decision.to_json())
        for claim in result.claims:
            sink.write("claims", claim.resource)
        for error in errors:
            sink.write("errors", error_record(error))
    _report_errors(errors, stderr)
    stdout.write(
        f"g0129 replay: {nfiles} file(s), {len(index)} resource(s), {len(result.decisions)} encounter(s) decided, "
        f"{len(result.claims)} claim(s) annotated -> {args.out}/\n"
    )
    stdout.write("  outcomes: " + ", ".join(f"{o} {outcomes.get(o, 0)}" for o in ("bill", "review", "do-not-bill")) + "\n")
    if by_rule:
        stdout.write("  findings by rule:\n")
        for info in rules.rules:
            counts = [f"{sev} {by_rule[(info.id, sev)]}" for sev in ("error", "review", "warning", "info") if by_rule[(info.id, sev)]]
            if counts:
                stdout.write(f"    {info.id:<15} {', '.join(counts)}\n")
    if errors:
        stdout.write(f"  invalid input: {len(errors)} (see {args.out}/errors.ndjson)\n")
    return EXIT_INVALID_INPUT if errors else EXIT_OK


def _evaluate(args: argparse.Namespace, rules: RuleSet, stdout: IO[str], stderr: IO[str]) -> int:
    index, errors, _ = _load(args.paths, stderr)
    result = evaluate(index, rules, validate_claims=False)
    for decision in result.decisions:
        stdout.write(orjson.dumps(decision.to_json()).decode() + "\n")
    _report_errors(errors, stderr)
    return EXIT_INVALID_INPUT if errors else EXIT_OK


def _rules(args: argparse.Namespace, rules: RuleSet, stdout: IO[str], stderr: IO[str]) -> int:
    if args.json:
        catalog = [
            {"id": r.id, "checks": r.checks, "when_violated": r.when_violated, "source": r.source, "status": r.status}
            for r in rules.rules
        ]
        stdout.write(orjson.dumps({"ruleset_version": rules.version, "rules": catalog}, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK
    stdout.write(f"G0129 ruleset {rules.version} ({rules.source_dir})\n\n")
    for r in rules.rules:
        stdout.write(f"{r.id}  [{r.status}]\n  checks:        {r.checks}\n  when violated: {r.when_violated}\n  source:        {r.source}\n\n")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g0129", description="Decide G0129 billing (OT in PHP/IOP) from FHIR R4 data.")
    parser.add_argument("--mappings", type=Path, default=None, help="rule tables directory (default: the bundled mappings/)")
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="decide FHIR bundles/NDJSON offline and write the results to a directory")
    replay.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="Bundle, resource, NDJSON file or directory")
    replay.add_argument("--out", type=Path, default=Path("out"), help="output directory (default: ./out)")
    replay.add_argument(
        "--no-validate", dest="validate", action="store_false",
        help="skip the R4 model validation of each annotated Claim (about 4x faster bulk re-runs)",
    )
    replay.set_defaults(run=_replay)
    evaluate_ = sub.add_parser("evaluate", help="print decisions as NDJSON on stdout; write nothing")
    evaluate_.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    evaluate_.set_defaults(run=_evaluate)
    rules_ = sub.add_parser("rules", help="show the rule catalog with sources and status")
    rules_.add_argument("--json", action="store_true", help="as JSON")
    rules_.set_defaults(run=_rules)
    return parser


def main(argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message
        return int(exc.code or 0) and EXIT_USAGE
    try:
        rules = load_ruleset(args.mappings)
        return int(args.run(args, rules, stdout, stderr))
    except (MappingError, UsageError) as exc:
        stderr.write(f"g0129: {exc}\n")
        return EXIT_USAGE
    except AdapterError as exc:
        stderr.write(f"g0129: {exc}\n")
        return EXIT_INVALID_INPUT
    except KeyboardInterrupt:
        stderr.write("g0129: interrupted; nothing was written\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
