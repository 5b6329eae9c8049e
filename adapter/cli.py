"""The `g0129` command.

    g0129 replay PATH... [--out DIR]     decide, write decisions/claims/errors NDJSON
          [--fhir-base URL [--dry-run]]  ... and write the annotated Claims to a FHIR server
    g0129 evaluate PATH...               print decisions as NDJSON, write nothing
    g0129 rules                          the rule catalog, with sources and status
    g0129 serve [--host] [--port]        the sidecar service (settings from G0129_* variables)
    g0129 subscribe --endpoint URL       create/update the rest-hook Subscriptions
    g0129 queue list|retry|purge         look at and act on the durable job queue

Exit codes: 0 every input processed, 1 some input invalid (the rest still processed), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import orjson

from .errors import AdapterError, FHIRError, InputError, MappingError, UsageError
from .fhir_client import FHIRClient
from .ingest import Index, load_paths
from .pipeline import RunResult, evaluate
from .queue import JobQueue
from .ruleset import RuleSet, load_ruleset
from .settings import Settings
from .sinks import DirectorySink, error_record
from .subscribe import SubscriptionResult, subscribe
from .writeback import Writer, push_claims

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
    failed = False
    if args.fhir_base:
        failed = asyncio.run(_push(args, index, result, rules, stdout, stderr))
    elif args.dry_run:
        raise UsageError("--dry-run needs --fhir-base: it shows what would be written to that server")
    return EXIT_INVALID_INPUT if errors or failed else EXIT_OK


async def _push(args: argparse.Namespace, index: Index, run: RunResult, rules: RuleSet, stdout: IO[str], stderr: IO[str]) -> bool:
    settings = dataclasses.replace(Settings.from_env(), fhir_base_url=args.fhir_base.rstrip("/"))
    async with FHIRClient.from_settings(settings) as client:
        results = await push_claims(Writer(client, dry_run=args.dry_run), index, run, rules)
    failed = False
    for claim, outcome in results:
        if isinstance(outcome, FHIRError):
            failed = True
            stderr.write(f"error: {claim.key}: not written: {outcome}\n")
            continue
        for written in outcome:
            if written.result == "dry-run":
                stdout.write(written.diff or f"{written.claim}: no change\n")
            else:
                version = f" (version {written.version})" if written.version else ""
                stdout.write(f"{written.claim}: {written.result}{version}\n")
    return failed


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


def _serve(args: argparse.Namespace, rules: RuleSet, stdout: IO[str], stderr: IO[str]) -> int:
    # Imported here: the web stack is not needed (nor paid for) by replay and evaluate.
    import uvicorn

    from .service import create_app

    app = create_app(Settings.from_env(), rules=rules, dry_run=args.dry_run)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return EXIT_OK


def _subscribe(args: argparse.Namespace, rules: RuleSet, stdout: IO[str], stderr: IO[str]) -> int:
    settings = Settings.from_env()
    if not settings.webhook_token:
        raise UsageError("G0129_WEBHOOK_TOKEN must be set: the Subscriptions carry it to the webhook")
    if args.fhir_base:
        settings = dataclasses.replace(settings, fhir_base_url=args.fhir_base.rstrip("/"))

    async def run() -> list[SubscriptionResult]:
        async with FHIRClient.from_settings(settings) as client:
            return await subscribe(client, args.endpoint, settings.webhook_token or "", payload=args.payload, wait=args.wait)

    results = asyncio.run(run())
    for r in results:
        stdout.write(f"Subscription/{r.id}: {r.action}, {r.status}  ({r.criteria})\n")
    if args.wait and any(r.status != "active" for r in results):
        stderr.write(f"g0129: not every Subscription became active within {args.wait:g} s\n")
        return EXIT_INVALID_INPUT
    return EXIT_OK


def _queue(args: argparse.Namespace, rules: RuleSet, stdout: IO[str], stderr: IO[str]) -> int:
    with JobQueue.from_settings(Settings.from_env()) as queue:
        if args.action == "list":
            for job in queue.list(args.state):
                stdout.write(orjson.dumps({
                    "id": job.id, "state": job.state, "kind": job.kind,
                    "resource": f"{job.resource_type}/{job.resource_id}" + (f"/_history/{job.version_id}" if job.version_id else ""),
                    "source": job.source, "attempts": job.attempts, "last_error": job.last_error,
                }).decode() + "\n")
            counts = queue.counts()
            stderr.write(", ".join(f"{state} {n}" for state, n in counts.items()) + "\n")
        elif args.action == "retry":
            if args.job is None and not args.all:
                raise UsageError("say which job to retry (its id) or --all dead letters")
            stdout.write(f"{queue.retry(args.job)} job(s) back in the queue\n")
        else:
            stdout.write(f"{queue.purge(args.state)} {args.state} job(s) purged\n")
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
    replay.add_argument("--fhir-base", metavar="URL", help="also write the annotated Claims to this FHIR server (If-Match, Provenance)")
    replay.add_argument("--dry-run", action="store_true", help="with --fhir-base: print the Claim diffs, write nothing")
    replay.set_defaults(run=_replay)
    evaluate_ = sub.add_parser("evaluate", help="print decisions as NDJSON on stdout; write nothing")
    evaluate_.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    evaluate_.set_defaults(run=_evaluate)
    rules_ = sub.add_parser("rules", help="show the rule catalog with sources and status")
    rules_.add_argument("--json", action="store_true", help="as JSON")
    rules_.set_defaults(run=_rules)
    serve = sub.add_parser("serve", help="run the sidecar service (settings from G0129_* variables)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--dry-run", action="store_true", help="decide and log the Claim diffs; write nothing back")
    serve.set_defaults(run=_serve)
    subscribe_ = sub.add_parser("subscribe", help="create or update the R4 rest-hook Subscriptions (idempotent)")
    subscribe_.add_argument("--endpoint", required=True, help="the adapter's notify URL as the FHIR server reaches it, e.g. http://adapter:8000/notify")
    subscribe_.add_argument("--fhir-base", metavar="URL", help="FHIR server (default: G0129_FHIR_BASE_URL)")
    subscribe_.add_argument("--no-payload", dest="payload", action="store_false", help="notify without the resource (the adapter searches)")
    subscribe_.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the Subscriptions to become active (0: don't)")
    subscribe_.set_defaults(run=_subscribe)
    queue = sub.add_parser("queue", help="the durable job queue under G0129_DATA_DIR")
    actions = queue.add_subparsers(dest="action", required=True)
    list_ = actions.add_parser("list", help="list jobs in a state")
    list_.add_argument("--state", choices=["pending", "dead", "done"], default="pending")
    retry = actions.add_parser("retry", help="put dead letters back in the queue")
    retry.add_argument("job", nargs="?", type=int, help="job id (default with --all: every dead letter)")
    retry.add_argument("--all", action="store_true")
    purge = actions.add_parser("purge", help="delete finished or dead jobs")
    purge.add_argument("--state", choices=["done", "dead"], required=True)
    queue.set_defaults(run=_queue)
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
        rules = load_ruleset(args.mappings or Settings.from_env().mappings_dir)
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
    except BrokenPipeError:
        # The reader went away (`g0129 evaluate ... | head`): stop quietly, as Unix tools do.
        # Python would otherwise complain again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_INVALID_INPUT


if __name__ == "__main__":
    sys.exit(main())
