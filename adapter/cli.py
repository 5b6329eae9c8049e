"""The `g0129` command.

    g0129 replay PATH... [--out DIR]     decide, write decisions/claims/errors NDJSON
          [--fhir-base URL [--dry-run]]  ... and write the annotated Claims to a FHIR server
    g0129 evaluate PATH...               print decisions as NDJSON, write nothing
    g0129 rules [--json]                 the rule catalog, with sources and status
    g0129 rules check [DIR]              every problem of a rule table directory
    g0129 rules diff DIR                 what a site's tables change against the bundled ones
    g0129 serve [--host] [--port]        the sidecar service (settings from G0129_* variables)
    g0129 subscribe --endpoint URL       create/update the rest-hook Subscriptions
    g0129 queue list|retry|purge         look at and act on the durable job queue
    g0129 --version                      the package and ruleset versions

The global options (`--mappings DIR`, `--no-progress`) go before or after the command.
Everything a command can check about its arguments is checked before it reads any input.

Exit codes: 0 every input processed, 1 some input invalid (the rest still processed) or a write
failed, 2 usage or rule-table error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import tempfile
import textwrap
from collections import Counter
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import orjson

# tqdm ships no type information (typeshed has `types-tqdm`, which we do not require); the
# second code keeps mypy quiet where those stubs happen to be installed.
from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

from .errors import AdapterError, FHIRError, InputError, MappingError, UsageError
from .fhir_client import FHIRClient
from .ingest import DEFAULT_MAX_FILE_BYTES, INPUT_SUFFIXES, Index, iter_input_files, load_paths
from .pipeline import RunResult, evaluate
from .queue import JobQueue
from .ruleset import DEFAULT_MAPPINGS_DIR, RuleSet, check_tables, diff_tables, load_ruleset
from .settings import Settings
from .review import REVIEW_COLUMNS, review_rows
from .sinks import DirectorySink, error_record
from .subscribe import SubscriptionResult, subscribe
from .writeback import Writer, push_claims

__all__ = ["main"]

EXIT_OK, EXIT_INVALID_INPUT, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PACKAGE = "g0129-adapter"
LOOKED_FOR = ", ".join(f"*{suffix}" for suffix in INPUT_SUFFIXES)


class _Context:
    """What a command may need beyond its arguments, made when first asked for.

    The rule tables are loaded only by the commands that use them, so `rules check` and
    `rules diff` can look at tables that do not load, and `queue` works whatever they say.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self._mappings: Path | None = args.mappings
        self._rules: RuleSet | None = None

    def mappings_dir(self) -> Path:
        """The rule tables in use: --mappings, else G0129_MAPPINGS_DIR, else the bundled ones."""
        return self._mappings or Settings.from_env().mappings_dir or DEFAULT_MAPPINGS_DIR

    def rules(self) -> RuleSet:
        if self._rules is None:
            self._rules = load_ruleset(self.mappings_dir())
        return self._rules


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class _Progress:
    """One progress bar at a time on stderr (reading, deciding, validating), cleared when done.

    Only on a terminal: never a byte of it in a pipe or a file, where it would be noise in a log.
    """

    _STAGES = {"decide": ("deciding", "encounter"), "validate": ("validating", "claim")}

    def __init__(self, stream: IO[str], enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled and _is_terminal(stream)
        self._bar: Any = None  # tqdm | None
        self._stage = ""

    def start(self, stage: str, total: int, unit: str, in_bytes: bool = False) -> None:
        self.close()
        self._stage = stage
        if self.enabled:
            self._bar = tqdm(
                total=total, desc=stage, unit=unit, file=self.stream, leave=False, dynamic_ncols=True,
                unit_scale=in_bytes, unit_divisor=1024 if in_bytes else 1000,
            )

    def advance(self, n: int) -> None:
        """`ingest.load_paths`'s `on_bytes`: n more bytes read."""
        if self._bar is not None:
            self._bar.update(n)

    def pipeline(self, stage: str, done: int, total: int) -> None:
        """`pipeline.evaluate`'s `progress`: `done` of `total` cases decided or Claims validated."""
        label, unit = self._STAGES.get(stage, (stage, "it"))
        if label != self._stage:
            self.start(label, total, unit)
        if self._bar is not None:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = ""

    def __enter__(self) -> _Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _input_files(paths: list[Path], stderr: IO[str]) -> list[Path]:
    """The files to read, or a UsageError before any is read: a path that does not exist, or
    nothing to read at all. A directory without input beside others that have some is a warning."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"no such file or directory: {', '.join(missing)}")
    files: list[Path] = []
    empty: list[str] = []
    for path in paths:
        found = list(iter_input_files([path]))
        if not found:
            empty.append(str(path))
        files.extend(found)
    if not files:
        raise UsageError(f"no FHIR input found in {', '.join(empty)} (looked for {LOOKED_FOR})")
    for name in empty:
        stderr.write(f"g0129: warning: no FHIR input found in {name} (looked for {LOOKED_FOR})\n")
    return files


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # reported as an input error when it is read


def _load(files: list[Path], paths: list[Path], progress: _Progress, max_file_bytes: int) -> tuple[Index, list[InputError], int]:
    progress.start("reading", sum(_size(f) for f in files), "B", in_bytes=True)
    index, errors, nfiles = load_paths(files, on_bytes=progress.advance, max_file_bytes=max_file_bytes)
    progress.close()
    if not len(index) and not errors:
        names = ", ".join(str(p) for p in paths)
        raise UsageError(f"no FHIR resources in {names} ({nfiles} file(s) read, each empty or an empty Bundle)")
    return index, errors, nfiles


def _check_out(out: Path) -> None:
    """Refuse an --out that is no directory, before any input is read."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {out}: cannot be created ({parent} is not a directory)")
            break


def _make_out(out: Path) -> None:
    """Create --out and make sure a file can be written in it, before any input is read."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def _check_base_url(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--fhir-base must be an http(s) URL, got {url!r}")


def _report_errors(errors: list[InputError], stderr: IO[str]) -> None:
    for error in errors:
        stderr.write(f"error: {error}\n")


def _replay(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    if args.dry_run and not args.fhir_base:
        raise UsageError("--dry-run needs --fhir-base: it shows what would be written to that server")
    if args.fhir_base:
        _check_base_url(args.fhir_base)
    _check_out(args.out)
    files = _input_files(args.paths, stderr)
    rules = ctx.rules()
    _make_out(args.out)
    # Held from the start: a second run into the same --out is refused before any work, and a
    # run that fails or is interrupted leaves the previous outputs as they were.
    with DirectorySink(args.out) as sink:
        with _Progress(stderr, args.progress) as progress:
            index, errors, nfiles = _load(files, args.paths, progress, args.max_file_bytes)
            result = evaluate(index, rules, validate_claims=args.validate, progress=progress.pipeline)
        errors.extend(result.errors)
        outcomes = Counter(d.outcome for d in result.decisions)
        by_rule = Counter((f.rule, f.severity) for d in result.decisions for f in d.findings)
        for decision in result.decisions:
            sink.write("decisions", decision.to_json())
        for claim in result.claims:
            sink.write("claims", claim.resource)
        for error in errors:
            sink.write("errors", error_record(error))
        sink.write_csv("review", REVIEW_COLUMNS, review_rows(result.claims))
    _report_errors(errors, stderr)
    decided = len(result.decisions)
    stdout.write(f"g0129 replay: {nfiles} file(s), {len(index)} resource(s) -> {args.out}/\n")
    stdout.write(
        f"  encounters: {result.encounters_seen} seen, {decided} in scope and decided "
        f"(an OT session or a PHP/IOP program), {max(result.encounters_seen - decided, 0)} out of scope\n"
    )
    stdout.write(f"  claims: {len(result.claims)} annotated\n")
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
    return EXIT_INVALID_INPUT if errors or failed else EXIT_OK


async def _push(args: argparse.Namespace, index: Index, run: RunResult, rules: RuleSet, stdout: IO[str], stderr: IO[str]) -> bool:
    settings = dataclasses.replace(Settings.from_env(), fhir_base_url=args.fhir_base.rstrip("/"))
    async with FHIRClient.from_settings(settings) as client:
        results = await push_claims(Writer(client, dry_run=args.dry_run, review_owner=settings.review_owner), index, run, rules)
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


def _evaluate(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    files = _input_files(args.paths, stderr)
    rules = ctx.rules()
    with _Progress(stderr, args.progress) as progress:
        index, errors, _ = _load(files, args.paths, progress, args.max_file_bytes)
        result = evaluate(index, rules, validate_claims=False, progress=progress.pipeline)
    for decision in result.decisions:
        stdout.write(orjson.dumps(decision.to_json()).decode() + "\n")
    _report_errors(errors, stderr)
    return EXIT_INVALID_INPUT if errors else EXIT_OK


def _rules(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    rules = ctx.rules()
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


def _table_problems(directory: Path, stderr: IO[str]) -> bool:
    """Print every problem of the tables in `directory` to stderr; True when there were any."""
    problems = check_tables(directory)
    for problem in problems:
        stderr.write(f"{problem}\n")
    return bool(problems)


def _rules_check(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    directory = args.dir or ctx.mappings_dir()
    if _table_problems(directory, stderr):
        return EXIT_USAGE
    stdout.write(f"{directory}: the rule tables are valid (ruleset {load_ruleset(directory).version})\n")
    return EXIT_OK


def _rules_diff(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    if _table_problems(args.dir, stderr):
        return EXIT_USAGE
    changes = diff_tables(args.dir)
    stdout.write("".join(f"{line}\n" for line in changes) or "no change against the bundled tables\n")
    return EXIT_OK


def _version(ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    try:
        package = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        package = "(not installed)"
    try:
        ruleset = f"ruleset {ctx.rules().version}"
    except MappingError as exc:
        stdout.write(f"g0129 {package} (ruleset not loaded)\n")
        stderr.write(f"g0129: {exc}\n")
        return EXIT_USAGE
    stdout.write(f"g0129 {package} ({ruleset})\n")
    return EXIT_OK


def _serve(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    # Imported here: the web stack is not needed (nor paid for) by replay and evaluate.
    import uvicorn

    from .logs import configure
    from .service import create_app

    settings = Settings.from_env()
    level = args.log_level or settings.log_level
    # Once, before anything logs; uvicorn gets no logging config of its own (log_config=None),
    # so its lines, the access log included, go through the same handler and filter.
    configure(settings.log_format, level, stderr)
    rules = ctx.rules()
    app = create_app(settings, rules=rules, dry_run=args.dry_run)
    logging.getLogger("adapter").info(
        "g0129 serve on %s:%d, ruleset %s%s", args.host, args.port, rules.version, ", dry run: nothing is written" if args.dry_run else "",
        extra={"event": "start", "ruleset": rules.version, "dry_run": args.dry_run, "fhir_base": settings.fhir_base_url},
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=level, log_config=None)
    return EXIT_OK


def _subscribe(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
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


def _queue(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
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


def _settings_variables() -> list[str]:
    """Every G0129_* variable, named after the Settings field it sets (as settings.py reads them)."""
    return [f"G0129_{f.name.upper()}" for f in dataclasses.fields(Settings)]


def _epilog() -> str:
    variables = textwrap.fill(", ".join(_settings_variables()), width=78, initial_indent="  ", subsequent_indent="  ")
    return (
        "exit codes:\n"
        "  0    every input processed\n"
        "  1    some input was invalid (the rest is still processed and written),\n"
        "       or a write to the FHIR server failed\n"
        "  2    usage error (bad arguments, a missing path, no input) or rule tables\n"
        "       that cannot be used\n"
        "  130  interrupted\n"
        "\n"
        'settings, read from the environment (see "Settings" in the README):\n'
        f"{variables}\n"
    )


def _global_options(in_subcommand: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. A subcommand's copy defaults
    to SUPPRESS, so it leaves what was given before the subcommand alone."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--mappings", type=Path, metavar="DIR", default=argparse.SUPPRESS if in_subcommand else None,
        help="rule tables directory, e.g. a site's copy (default: G0129_MAPPINGS_DIR, else the bundled tables)",
    )
    options.add_argument(
        "--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS if in_subcommand else True,
        help="no progress bars (they are only ever shown on a terminal, on stderr)",
    )
    return options


def _byte_count(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    try:
        number = int(text[:-1]) * units[text[-1].lower()] if text[-1:].lower() in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with k, m or g)") from None
    if number <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return number


def _max_file_bytes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-file-bytes", type=_byte_count, default=DEFAULT_MAX_FILE_BYTES, metavar="SIZE",
        help="the largest JSON file, or NDJSON line, that is read (e.g. 512m; default 512m): a larger one is an input error",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="g0129", description="Decide G0129 billing (OT in PHP/IOP) from FHIR R4 data.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter, parents=[_global_options(False)],
    )
    parser.add_argument("--version", action="store_true", help="print the package and ruleset versions and exit")
    common = [_global_options(True)]
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    replay = sub.add_parser("replay", parents=common, help="decide FHIR bundles/NDJSON offline and write the results to a directory")
    replay.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="Bundle, resource, NDJSON file or directory (read recursively)")
    replay.add_argument("--out", type=Path, default=Path("out"), metavar="DIR", help="output directory (default: ./out)")
    _max_file_bytes(replay)
    replay.add_argument(
        "--no-validate", dest="validate", action="store_false",
        help="skip the R4 model validation of each annotated Claim (about 4x faster bulk re-runs)",
    )
    replay.add_argument("--fhir-base", metavar="URL", help="also write the annotated Claims to this FHIR server (If-Match, Provenance)")
    replay.add_argument("--dry-run", action="store_true", help="with --fhir-base: print the Claim diffs, write nothing")
    replay.set_defaults(run=_replay)
    evaluate_ = sub.add_parser("evaluate", parents=common, help="print decisions as NDJSON on stdout; write nothing")
    evaluate_.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="Bundle, resource, NDJSON file or directory (read recursively)")
    _max_file_bytes(evaluate_)
    evaluate_.set_defaults(run=_evaluate)
    rules_ = sub.add_parser(
        "rules", parents=common, help="show the rule catalog with sources and status; check or compare rule tables",
        usage="%(prog)s [-h] [--mappings DIR] [--no-progress] [--json] [check [DIR] | diff DIR]",
        description="Without an action: the rule catalog of the tables in use.",
    )
    rules_.add_argument("--json", action="store_true", help="the catalog as JSON")
    rules_.set_defaults(run=_rules)
    tables = rules_.add_subparsers(dest="tables", metavar="ACTION")
    check = tables.add_parser("check", parents=common, help="list every problem of a rule table directory (exit 2 if any)")
    check.add_argument("dir", nargs="?", type=Path, metavar="DIR", help="the tables to check (default: the ones in use, see --mappings)")
    check.set_defaults(run=_rules_check)
    diff = tables.add_parser("diff", parents=common, help="what a site's rule tables change against the bundled ones, rule by rule")
    diff.add_argument("dir", type=Path, metavar="DIR", help="the site's copy of the tables")
    diff.set_defaults(run=_rules_diff)
    serve = sub.add_parser("serve", parents=common, help="run the sidecar service (settings from G0129_* variables)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"],
        help="the lowest level logged (default: G0129_LOG_LEVEL, else info); the format is G0129_LOG_FORMAT (json or text)",
    )
    serve.add_argument("--dry-run", action="store_true", help="decide and log the Claim diffs; write nothing back")
    serve.set_defaults(run=_serve)
    subscribe_ = sub.add_parser("subscribe", parents=common, help="create or update the R4 rest-hook Subscriptions (idempotent)")
    subscribe_.add_argument("--endpoint", required=True, help="the adapter's notify URL as the FHIR server reaches it, e.g. http://adapter:8000/notify")
    subscribe_.add_argument("--fhir-base", metavar="URL", help="FHIR server (default: G0129_FHIR_BASE_URL)")
    subscribe_.add_argument("--no-payload", dest="payload", action="store_false", help="notify without the resource (the adapter searches)")
    subscribe_.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the Subscriptions to become active (0: don't)")
    subscribe_.set_defaults(run=_subscribe)
    queue = sub.add_parser("queue", parents=common, help="the durable job queue under G0129_DATA_DIR")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    list_ = actions.add_parser("list", parents=common, help="list jobs in a state")
    list_.add_argument("--state", choices=["pending", "dead", "done"], default="pending", help="which jobs (default: pending)")
    retry = actions.add_parser("retry", parents=common, help="put dead letters back in the queue")
    retry.add_argument("job", nargs="?", type=int, help="job id (default with --all: every dead letter)")
    retry.add_argument("--all", action="store_true", help="every dead letter")
    purge = actions.add_parser("purge", parents=common, help="delete finished or dead jobs")
    purge.add_argument("--state", choices=["done", "dead"], required=True, help="which jobs to delete")
    queue.set_defaults(run=_queue)
    return parser


def main(argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = _parser()
    try:
        # argparse prints to sys.stdout/sys.stderr: point them at ours (a caller's, a test's).
        with redirect_stdout(stdout), redirect_stderr(stderr):
            args = parser.parse_args(argv)
            if args.command is None and not args.version:
                parser.error("say which command to run (g0129 --help lists them)")
    except SystemExit as exc:  # argparse has printed its usage message (or the help)
        return int(exc.code or 0) and EXIT_USAGE
    ctx = _Context(args)
    try:
        if args.version:
            return _version(ctx, stdout, stderr)
        return int(args.run(args, ctx, stdout, stderr))
    except (MappingError, UsageError) as exc:
        stderr.write(f"g0129: {exc}\n")
        return EXIT_USAGE
    except AdapterError as exc:
        stderr.write(f"g0129: {exc}\n")
        return EXIT_INVALID_INPUT
    except KeyboardInterrupt:
        stderr.write("g0129: interrupted; nothing was written\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`g0129 evaluate ... | head`): stop quietly, as Unix tools do.
        # Python would otherwise complain again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_INVALID_INPUT


if __name__ == "__main__":
    sys.exit(main())
