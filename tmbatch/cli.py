"""The `tmbatch` command line: parse, resolve, hand over, map the outcome to an exit code.

Logs go to stderr, data to files. Every error a user can cause ends in one clear
line and exit code 2; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from tmbatch import __version__
from tmbatch.config import ConfigError, Settings, check_model, resolve
from tmbatch.journal import JournalError
from tmbatch.logs import (  # noqa: F401  (RedactFilter: moved, still importable from here)
    REDACT,
    RedactFilter,
    add_log_format_arg,
    event,
    json_mode,
    say,
    setup_logging,
)
from tmbatch.reader import InputError, normalize_endpoint
from tmbatch.runner import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_USAGE,
    Runner,
    RunOptions,
)

log = logging.getLogger("tmbatch")

EXIT_CODES = """exit codes:
  0    every line succeeded
  1    the run finished and some lines failed (see failures.jsonl)
  2    usage, configuration or input error: nothing was sent
  3    stopped by a fatal error (401/403, unknown model on every request)
  4    an output file could not be written (disk full, I/O error); resume when fixed
  5    merge only: some input lines have no outcome, or more than one
  130  interrupted by SIGINT (Ctrl-C); run the same command again to resume
  143  stopped by SIGTERM (e.g. Kubernetes eviction); run it again to resume
"""

MORE_EXAMPLES = """more:
  tmbatch status out/                         # done / failed by class / not sent / unknown
  tmbatch resend out/ --class ambiguous       # the only way a possibly-billed line goes again
  tmbatch export out/ --ordered --combined    # outputs in input order
  tmbatch run jobs/label-sentiment.toml --sim # a declared job: labelling on the simulator
  tmbatch run in.jsonl -o out/shard-0 --shard 0/4 && tmbatch merge out/shard-* -o out/all
  tmbatch doctor                              # which key/URL came from where; checks
  tmbatch report out/                         # HTML report (pip install 'tmbatch[report]')
"""

RUN_EXAMPLES = """examples:
  # try it with no credentials, against the built-in simulator
  tmbatch run samples/chat.jsonl -o out/ --sim

  # a real run: key from the environment, 64 in flight, 3000 requests/min
  export TENSORMESH_INFERENCE_API_KEY=...
  tmbatch run input.jsonl -o out/ --concurrency 64 --rpm 3000 --tpm 2000000

  # bare request bodies, one per line, model filled in when missing
  tmbatch run prompts.jsonl -o out/ --endpoint chat --model my-model

  # on-demand gateway (needs a base URL and your user id)
  tmbatch run input.jsonl -o out/ --surface on-demand \\
      --base-url https://external.nebius.tensormesh.ai --user-id $USER_UUID

  # resume after a crash, kill or eviction: the same command again
  tmbatch run input.jsonl -o out/
"""


def run_async(coro: Any) -> Any:
    """Run on uvloop when it is installed (the `fast` extra): bench/ablate.py measured ~13 %
    less CPU per request. TMBATCH_LOOP=asyncio forces the standard loop."""
    choice = os.environ.get("TMBATCH_LOOP", "auto").strip().lower() or "auto"
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"TMBATCH_LOOP={choice!r}: expected auto, uvloop or asyncio")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("TMBATCH_LOOP=uvloop but uvloop is not installed: "
                                  "pip install 'tmbatch[fast]'") from None
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return v


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "connection (flag > environment > default; ~/.config/tensormesh is read only with "
        "--tm-config)"
    )
    g.add_argument("--surface", choices=["serverless", "on-demand"],
                   help="inference surface (default: serverless)")
    g.add_argument("--base-url", help="API base URL without /v1 (env "
                   "TENSORMESH_SERVERLESS_BASE_URL or TENSORMESH_ON_DEMAND_BASE_URL; serverless "
                   "default https://serverless.tensormesh.ai)")
    g.add_argument("--api-key-file", metavar="FILE", help="read the inference API key from FILE "
                   "(else env TENSORMESH_INFERENCE_API_KEY). There is deliberately no --api-key: "
                   "a key on the command line shows in `ps`")
    g.add_argument("--user-id", help="on-demand user UUID sent as X-User-Id "
                   "(env TENSORMESH_ON_DEMAND_USER_ID)")
    g.add_argument("--timeout", help="seconds per request (env TENSORMESH_TIMEOUT_SECONDS; "
                   "default 600)")
    g.add_argument("--max-retries", help="retries of not_sent/rejected attempts per line "
                   "(env TENSORMESH_MAX_RETRIES; default 5)")
    g.add_argument("--ca-bundle", help="PEM file of CAs to trust (env TENSORMESH_CA_BUNDLE)")
    g.add_argument("--tm-config", nargs="?", const="", metavar="PATH",
                   help="also read api key, user id and model from the tm CLI's config.toml "
                   "[managed] table (default $TM_CONFIG_HOME or ~/.config/tensormesh)")
    g.add_argument("--allow-insecure-http", action="store_true",
                   help="allow sending the key over plain http:// to a non-loopback host")


def connection_flags(ns: argparse.Namespace) -> dict[str, str | None]:
    return {
        "surface": ns.surface, "base_url": ns.base_url, "api_key_file": ns.api_key_file,
        "user_id": ns.user_id, "timeout": ns.timeout, "max_retries": ns.max_retries,
        "ca_bundle": ns.ca_bundle, "tm_config": ns.tm_config,
        "allow_insecure_http": "1" if ns.allow_insecure_http else None,
    }


def build_parser() -> argparse.ArgumentParser:
    from tmbatch.sim import add_sim_arguments

    parser = argparse.ArgumentParser(
        prog="tmbatch",
        allow_abbrev=False,
        description="Run large batches of inference requests against Tensormesh, as fast as "
        "the account's limits allow, without paying twice for a request by accident.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RUN_EXAMPLES + "\n" + MORE_EXAMPLES + "\n" + EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"tmbatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", allow_abbrev=False,
        help="send every line of a JSONL file (resumes when -o holds a run)",
        description="Send every request of INPUT and write results.jsonl, failures.jsonl, "
        "journal.jsonl and summary.json to the output directory. Running the same command "
        "on the same output directory resumes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RUN_EXAMPLES + "\n" + EXIT_CODES,
    )
    run.add_argument("input", help="JSONL file: OpenAI Batch lines, or bare bodies with "
                     "--endpoint; - reads stdin (not resumable); or a job file NAME.toml "
                     "(flags override it)")
    run.add_argument("-o", "--output", help="output directory (default: INPUT's name + .out)")
    g = run.add_argument_group("input")
    g.add_argument("--endpoint", help="bare bodies: route for every line (chat, completions, "
                   "responses, tokenize, detokenize or the path); custom_id becomes line-N")
    g.add_argument("--model", help="fill body.model where a line has none")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="stream every line that does not say (SSE, aggregated into the same body)")
    g.add_argument("--max-line-bytes", type=_positive_int, default=None,
                   help="longer lines are failures (default 32 MiB)")
    g.add_argument("--shard", type=_shard, help="take lines I, I+N, ... (0-based I/N)")
    g = run.add_argument_group("limits")
    g.add_argument("-c", "--concurrency", type=_positive_int, default=None,
                   help="requests in flight at once (default 64)")
    g.add_argument("--rpm", type=_positive_float, help="requests per minute (leaky bucket)")
    g.add_argument("--tpm", type=_positive_float, help="tokens per minute, estimated before "
                   "sending (prompt chars/4 + max_tokens) and corrected from usage")
    g.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="adapt concurrency to 429s (AIMD, --concurrency is the ceiling); on by "
                   "default when --rpm is not given")
    g = run.add_argument_group("checkpoint")
    g.add_argument("--fsync", choices=["always", "interval", "never"], default=None,
                   help="always: fsync before every send (slowest, survives power loss "
                   "exactly); interval: flush every write, fsync once a second (default; kill -9 "
                   "loses nothing, power loss at most ~1 s); never: leave it to the OS")
    g.add_argument("--restart", action="store_true",
                   help="start over: move the old files to OUTPUT/previous-TIME/ (never deleted)")
    g.add_argument("--drain-timeout", type=_positive_float, default=None,
                   help="on SIGINT/SIGTERM wait this long for requests in flight (default 25, "
                   "inside Kubernetes' 30 s grace period)")
    g.add_argument("--job-id", help="pin the job id that Idempotency-Keys derive from")
    g = run.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress, only warnings")
    g.add_argument("-v", "--verbose", action="count", default=0)
    g.add_argument("--progress-interval", type=_positive_float, default=10.0,
                   help="seconds between progress lines when stderr is not a TTY (default 10)")
    g.add_argument("--ordered", action="store_true",
                   help="when the run finishes, also write results.ordered.jsonl and "
                   "failures.ordered.jsonl in input order (as `tmbatch export`)")
    add_log_format_arg(g)
    add_connection_args(run)
    run.add_argument("--no-preflight", action="store_true",
                     help="skip the checks before the first request (GET /health, /version, "
                     "/v1/models with the input's models, POST /tokenize with the key)")
    g = run.add_argument_group("demo: the built-in simulator (no credentials)")
    g.add_argument("--sim", action="store_true",
                   help="start the simulator on 127.0.0.1 in-process and send there")
    add_sim_arguments(g)

    val = sub.add_parser(
        "validate", help="check an input file without sending anything",
        description="Read INPUT as `run` would and report every bad line. Exit 0 when every "
        "line is good, 1 when some are bad, 2 when the file cannot be read.",
    )
    val.add_argument("input")
    val.add_argument("--endpoint")
    val.add_argument("--model")
    val.add_argument("--json", action="store_true", help="one JSON object per bad line, then "
                     "a summary object, on stdout")
    add_log_format_arg(val)

    rep = sub.add_parser(
        "report", help="an HTML page of a run: throughput, latency, TTFT, 429 pauses, failures",
        description="Read OUTPUT's journal (and summary.json) and write a self-contained "
        "OUTPUT/report/index.html with its charts as PNGs beside it. Needs the optional "
        "extra: pip install 'tmbatch[report]'.",
    )
    rep.add_argument("out_dir", metavar="OUTPUT", help="a run's output directory")
    rep.add_argument("-o", "--output", help="directory to write to (default OUTPUT/report)")
    add_log_format_arg(rep)

    st = sub.add_parser(
        "status", help="where a run stands: done, failed by class, not sent, unknown outcome",
        description="Read-only; safe while the run is going. Exit 0 when the run is finished, "
        "1 when it is not (or still running), 2 when OUTPUT is not a tmbatch directory.",
    )
    st.add_argument("output", help="the run's output directory")
    st.add_argument("--json", action="store_true", help="one JSON object on stdout, for scripts")

    rs = sub.add_parser(
        "resend", allow_abbrev=False,
        help="send failed lines again, explicitly (the only way an ambiguous one is re-sent)",
        description="List the selected failed lines, ask for confirmation (or --yes), and send "
        "them again with the same Idempotency-Key. A later success supersedes the failure: "
        "failures.jsonl keeps one outcome per line. Example: tmbatch resend out/ --class "
        "ambiguous --yes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXIT_CODES,
    )
    rs.add_argument("output", help="the run's output directory")
    rs.add_argument("--class", dest="classes", action="append",
                    choices=["ambiguous", "rejected", "not_sent", "permanent"],
                    help="resend the lines whose current outcome is this failure class "
                    "(repeatable; ambiguous = possibly processed; rejected/not_sent = retries "
                    "exhausted)")
    rs.add_argument("--ids", metavar="FILE", help="resend exactly these custom_ids (one a line)")
    rs.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rs.add_argument("--dry-run", action="store_true", help="only list what would be sent")
    rs.add_argument("-c", "--concurrency", type=_positive_int, default=16)
    rs.add_argument("--rpm", type=_positive_float)
    rs.add_argument("--tpm", type=_positive_float)
    rs.add_argument("-q", "--quiet", action="store_true")
    rs.add_argument("-v", "--verbose", action="count", default=0)
    add_connection_args(rs)
    g = rs.add_argument_group("demo")
    g.add_argument("--sim", action="store_true", help="send to the in-process simulator")
    add_sim_arguments(g)

    ex = sub.add_parser(
        "export", help="write results and failures in input order (bounded memory)",
        description="Writes results.ordered.jsonl and failures.ordered.jsonl (and with "
        "--combined outcomes.ordered.jsonl, one line per input line) sorted by input line, "
        "with an external merge sort: memory stays flat for any size.",
    )
    ex.add_argument("output", help="the run's output directory")
    ex.add_argument("--ordered", action="store_true", default=True,
                    help="sort by input line (the default and only order)")
    ex.add_argument("--combined", action="store_true",
                    help="also write outcomes.ordered.jsonl with results and failures together")
    ex.add_argument("--to", metavar="DIR", help="write there instead of the output directory")

    mg = sub.add_parser(
        "merge", help="join the output directories of a sharded run, checking coverage",
        description="Join the results.jsonl, failures.jsonl (and labels.jsonl) of shard output "
        "directories into OUT, with a merged summary.json, and check that every line of the "
        "input has exactly one outcome. Example: tmbatch merge out/shard-0 out/shard-1 -o out/all",
        epilog="exit codes: 0 every line succeeded; 1 every line has one outcome, some failed; "
        "2 the directories cannot be merged (different inputs or options, no journal, input "
        "unreadable); 5 incomplete: lines missing or duplicated (listed, and in summary.json)",
    )
    mg.add_argument("dirs", nargs="+", metavar="DIR", help="shard output directories")
    mg.add_argument("-o", "--output", required=True, help="directory for the merged files")
    mg.add_argument("--input", help="the input the shards ran, when the path in their journals "
                    "is not readable here (checked by fingerprint)")

    doc = sub.add_parser(
        "doctor", help="check credentials, base URL and models without billing anything",
        description="Show which settings were resolved from where (key redacted), then GET "
        "/health, /version, /v1/models (and whether INPUT's and --model's models are served) "
        "and POST /tokenize with the key. Exit 0 all good, 1 warnings, 3 a problem that "
        "would stop `tmbatch run`.",
    )
    doc.add_argument("input", nargs="?", help="JSONL input whose models to check (its first "
                     "10,000 lines)")
    doc.add_argument("--model", help="also check this model")
    doc.add_argument("--endpoint", help="as for run, when INPUT holds bare bodies")
    doc.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_connection_args(doc)

    mod = sub.add_parser("models", help="list the models served at the base URL",
                         description="GET /v1/models and print one served model name a line.")
    mod.add_argument("--json", action="store_true", help="the server's list as JSON")
    add_connection_args(mod)

    sim = sub.add_parser(
        "sim", help="serve the local Tensormesh API simulator",
        description="Serve every inference route on 127.0.0.1 with OpenAI-shaped bodies, "
        "optional latency, rate limits, 500s and dropped connections; GET /_sim/stats shows "
        "what it received. Example: tmbatch sim --port 8787 --sim-latency 0.1",
    )
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8787)
    add_sim_arguments(sim)
    return parser


def _settings_for_run(ns: argparse.Namespace) -> Settings:
    return resolve(connection_flags(ns), os.environ, require_key=not ns.sim)


async def _run_with_sim(ns: argparse.Namespace, opts: RunOptions, settings: Settings) -> int:
    from tmbatch.sim import sim_config_from_args, start_sim

    server = await start_sim(sim_config_from_args(ns))
    try:
        settings = dataclasses.replace(
            settings, base_url=server.url, ca_bundle=None,
            sources={**settings.sources, "base_url": "--sim"},
        )
        log.info("simulator on %s (no credentials needed)", server.url)
        return await _preflight_then_run(ns, opts, settings)
    finally:
        await server.stop()


async def _preflight_then_run(ns: argparse.Namespace, opts: RunOptions,
                              settings: Settings) -> int:
    """Preflight (unless --no-preflight; resend has none) stops a doomed run before billing."""
    if not getattr(ns, "no_preflight", True):
        from tmbatch.preflight import preflight_for_run

        code = await preflight_for_run(settings, opts.input, opts.model, opts.endpoint)
        if code is not None:
            return code
    return await Runner(opts, settings).run()


def cmd_doctor(ns: argparse.Namespace) -> int:
    from tmbatch.preflight import doctor

    settings = resolve(connection_flags(ns), os.environ, require_key=False)
    if settings.api_key:
        REDACT.secrets.append(settings.api_key)
    endpoint = normalize_endpoint(ns.endpoint) if ns.endpoint else None
    return run_async(doctor(settings, ns.input, ns.model, endpoint, as_json=ns.json))


def cmd_models(ns: argparse.Namespace) -> int:
    from tmbatch.preflight import list_models

    settings = resolve(connection_flags(ns), os.environ, require_key=False)
    if settings.api_key:
        REDACT.secrets.append(settings.api_key)
    return run_async(list_models(settings, as_json=ns.json))


def cmd_run(ns: argparse.Namespace) -> int:
    from tmbatch import labels
    from tmbatch.jobfile import prepare_run

    job = prepare_run(ns, os.environ)  # job.toml values, shard from env, defaults
    settings = _settings_for_run(ns)
    if settings.api_key:
        REDACT.secrets.append(settings.api_key)
    for w in settings.warnings:
        log.warning("%s", w)
    endpoint = normalize_endpoint(ns.endpoint) if ns.endpoint else None
    if ns.model:
        problem = check_model(ns.model, "--model")
        if problem:
            raise ConfigError(problem)
    out = Path(ns.output) if ns.output else Path(
        (Path(ns.input).stem if ns.input != "-" else "stdin") + ".out"
    )
    label_run = labels.setup(job, ns, out)  # a [label] job: ns.input -> OUT/requests.jsonl
    opts = RunOptions(
        input=ns.input, out_dir=out, endpoint=endpoint, model=ns.model, stream=ns.stream,
        concurrency=ns.concurrency, rpm=ns.rpm, tpm=ns.tpm, fsync=ns.fsync,
        restart=ns.restart, drain_timeout=ns.drain_timeout, job_id=ns.job_id, shard=ns.shard,
        quiet=ns.quiet, progress_interval=ns.progress_interval,
        max_line_bytes=ns.max_line_bytes, adaptive=ns.adaptive,
    )
    if ns.sim:
        code = run_async(_run_with_sim(ns, opts, settings))
    else:
        code = run_async(_preflight_then_run(ns, opts, settings))
    if label_run is not None:
        code = label_run.finish(code)
    if ns.ordered and code in (EXIT_OK, EXIT_FAILED):
        from tmbatch.export import export_ordered

        export_ordered(out)
    return code


def cmd_validate(ns: argparse.Namespace) -> int:
    from tmbatch.reader import BadLine, ReadStats, open_input, read_requests

    endpoint = normalize_endpoint(ns.endpoint) if ns.endpoint else None
    stats = ReadStats()
    good = bad = 0
    by_url: dict[str, int] = {}
    f = open_input(ns.input)
    try:
        for item in read_requests(f, endpoint=endpoint, model=ns.model, stats=stats):
            if isinstance(item, BadLine):
                bad += 1
                if ns.json:
                    sys.stdout.buffer.write(orjson.dumps({
                        "line": item.line, "custom_id": item.custom_id, "code": item.code,
                        "message": item.message}) + b"\n")
                else:
                    print(f"{ns.input}:{item.line}: {item.code}: {item.message}")
            else:
                good += 1
                by_url[item.url] = by_url.get(item.url, 0) + 1
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    summary: dict[str, Any] = {"lines": stats.lines, "valid": good, "invalid": bad,
                               "blank": stats.blank, "by_route": by_url}
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps(summary) + b"\n")
    else:
        routes = ", ".join(f"{k} {v}" for k, v in by_url.items()) or "none"
        print(f"{ns.input}: {stats.lines} lines, {good} valid ({routes}), {bad} invalid, "
              f"{stats.blank} blank skipped")
    return EXIT_FAILED if bad else EXIT_OK


def cmd_report(ns: argparse.Namespace) -> int:
    from tmbatch.report import write_report

    page = write_report(Path(ns.out_dir), Path(ns.output) if ns.output else None)
    print(page)
    return EXIT_OK


def cmd_merge(ns: argparse.Namespace) -> int:
    from tmbatch.merge import merge

    return merge(ns.dirs, ns.output, ns.input)


def cmd_sim(ns: argparse.Namespace) -> int:
    from tmbatch.sim import run_sim_forever, sim_config_from_args

    run_sim_forever(sim_config_from_args(ns), ns.host, ns.port)
    return EXIT_OK


def cmd_status(ns: argparse.Namespace) -> int:
    from tmbatch.status import has_journal, render, status

    out = Path(ns.output)
    if not has_journal(out):
        raise JournalError(f"{out} has no journal.jsonl: not a tmbatch output directory")
    st = status(out)
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps(st) + b"\n")
    else:
        print(render(st))
    return EXIT_OK if st["finished"] else EXIT_FAILED


def cmd_resend(ns: argparse.Namespace) -> int:
    from tmbatch.journal import read_header
    from tmbatch.resend import confirm, describe, select

    out = Path(ns.output)
    if not ns.classes and not ns.ids:
        raise ConfigError("say what to resend: --class ambiguous (or rejected, ...) or --ids FILE")
    if ns.classes and ns.ids:
        raise ConfigError("give either --class or --ids, not both")
    header = read_header(out)
    chosen = select(out, ns.classes or [], ns.ids)
    if not chosen:
        print(f"nothing to resend in {out}", file=sys.stderr)
        return EXIT_OK
    print(describe(chosen), file=sys.stderr)
    if ns.dry_run:
        return EXIT_OK
    if not ns.yes and not confirm(f"Send these {len(chosen)} request(s) again? [y/N]"):
        print("not sent", file=sys.stderr)
        return EXIT_FAILED
    settings = resolve(connection_flags(ns), os.environ, require_key=not ns.sim)
    if settings.api_key:
        REDACT.secrets.append(settings.api_key)
    options = header.get("options") or {}
    opts = RunOptions(
        input=header["input"], out_dir=out, endpoint=options.get("endpoint"),
        model=options.get("model"), stream=options.get("stream"),
        shard=tuple(options["shard"]) if options.get("shard") else None,
        concurrency=ns.concurrency, rpm=ns.rpm, tpm=ns.tpm, quiet=ns.quiet,
        only_lines={r.line for r in chosen},
        extra_header={"resend": len(chosen)},
        prior_attempts={r.line: r.attempts for r in chosen},
    )
    if ns.sim:
        code = run_async(_run_with_sim(ns, opts, settings))
    else:
        code = run_async(Runner(opts, settings).run())
    if code in (EXIT_OK, EXIT_FAILED):
        # Only the chosen lines were sent, each once: this run's successes are theirs.
        summary = orjson.loads((out / "summary.json").read_bytes())
        ok = summary["this_run"]["succeeded"]
        print(f"resend: {ok} of {len(chosen)} now succeeded", file=sys.stderr)
        return EXIT_OK if ok == len(chosen) else EXIT_FAILED
    return code


def cmd_export(ns: argparse.Namespace) -> int:
    from tmbatch.export import export_ordered
    from tmbatch.journal import read_header

    out = Path(ns.output)
    read_header(out)
    counts = export_ordered(out, Path(ns.to) if ns.to else None, combined=ns.combined)
    dest = ns.to or ns.output
    for name, n in counts.items():
        print(f"{Path(dest) / name}: {n} line(s)", file=sys.stderr)
    return EXIT_OK


COMMANDS = {"status": cmd_status, "resend": cmd_resend, "export": cmd_export,
            "run": cmd_run, "validate": cmd_validate, "sim": cmd_sim, "report": cmd_report,
            "merge": cmd_merge,
            "doctor": cmd_doctor, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a == "--api-key" or a.startswith("--api-key=") for a in args):
        # Say it without echoing the value: a key on a command line is already in `ps`.
        json_asked = ("json" in args and "--log-format" in args) or "--log-format=json" in args
        setup_logging(0, False, "json" if json_asked else "text")
        msg = ("there is no --api-key flag (a key on the command line shows in `ps` and shell "
               "history); set TENSORMESH_INFERENCE_API_KEY or pass --api-key-file FILE")
        say("error", msg, text=f"tmbatch: error: {msg}", level=logging.ERROR,
            exit_code=EXIT_USAGE)
        return EXIT_USAGE
    parser = build_parser()
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    setup_logging(getattr(ns, "verbose", 0), getattr(ns, "quiet", False),
                  getattr(ns, "log_format", "text"))
    try:
        code = COMMANDS[ns.command](ns)
        if json_mode():
            event("exit", f"exit code {code}", exit_code=code)
        return code
    except (ConfigError, InputError, JournalError, ValueError) as exc:
        say("error", _redacted(str(exc)), text=f"tmbatch: error: {_redacted(str(exc))}",
            level=logging.ERROR, exit_code=EXIT_USAGE)
        return EXIT_USAGE
    except KeyboardInterrupt:
        say("interrupted", "interrupted", text="tmbatch: interrupted", level=logging.ERROR,
            exit_code=EXIT_SIGINT)
        return EXIT_SIGINT
    except Exception as exc:  # a bug: say so without a wall of traceback or a key
        if os.environ.get("TMBATCH_DEBUG"):
            raise
        msg = (f"internal error: {type(exc).__name__}: {_redacted(str(exc))} "
               "(this is a bug; TMBATCH_DEBUG=1 shows the traceback)")
        say("internal_error", msg, text=f"tmbatch: {msg}", level=logging.ERROR, exit_code=70)
        return 70


def _redacted(text: str) -> str:
    for s in REDACT.secrets:
        text = text.replace(s, "[redacted]")
    return text
