"""`tmbatch run`: everything before the runner takes over, and the labels/export after it."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from tmbatch.base import defaults as D
from tmbatch.base.config import Settings
from tmbatch.base.exitcodes import ExitCode, help_text
from tmbatch.base.files import JOURNAL
from tmbatch.base.logs import add_log_format_arg, json_mode
from tmbatch.cli.common import (
    add_budget_args,
    add_connection_args,
    add_sim_group,
    on_sim_if_asked,
    positive_float,
    positive_int,
    run_async,
    shard_arg,
    subcommand,
)
from tmbatch.cli.fleet import add_fleet_args
from tmbatch.inputs.samples import VIA
from tmbatch.journal.cache import MODES
from tmbatch.limits import SCOPES
from tmbatch.run.config import Learnt, RunConfig
from tmbatch.run.runner import Runner

log = logging.getLogger("tmbatch")

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

  # every line to two models, three samples each: out/tm-small/ and out/org%2Fmodel/,
  # each a standard output directory (custom_id#0..#2, "sample" in each outcome line)
  tmbatch run input.jsonl -o out/ --models tm-small,org/model --samples 3

  # every setting as resolved and where it came from (flag, job file, env, default);
  # sends nothing, writes nothing, exits 0
  tmbatch run jobs/nightly.toml -c 8 --print-config

  # the input checked, its tokens and cost at your prices, and doctor: nothing billed
  tmbatch run input.jsonl -o out/ --price tm-small=0.20:0.60 --dry-run
"""


def add_run_parser(sub: Any) -> None:
    run = subcommand(
        sub, "run", "send every line of a JSONL file (resumes when -o holds a run)",
        "Send every request of INPUT and write results.jsonl, failures.jsonl, "
        "journal.jsonl and summary.json to the output directory. Running the same command "
        "on the same output directory resumes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RUN_EXAMPLES + "\n" + help_text(),
    )
    run.add_argument("input", help="JSONL file: OpenAI Batch lines, or bare bodies with "
                     "--endpoint; - reads stdin (not resumable); a Parquet or CSV table (with "
                     "--body-column, or a job file's [label] table); any of them as a URL "
                     "(s3://, gs://, az://, http(s)://; extras tmbatch[s3], [gcs], [azure]); "
                     "or a job file NAME.toml (flags override it)")
    run.add_argument("-o", "--output", help="output directory (default: INPUT's name + .out), "
                     "or a bucket URL (s3://, gs://, az://, file://): the journal is shipped "
                     "there as segments by group commit (docs: Data in buckets)")
    _input_args(run.add_argument_group("input"))
    _fanout_args(run.add_argument_group("several models and samples (docs: Models and "
                                         "samples)"))
    _limit_args(run.add_argument_group("limits"))
    add_budget_args(run.add_argument_group("budget and prices (README: Cost and budgets)"))
    _checkpoint_args(run.add_argument_group("checkpoint"))
    _cache_args(run.add_argument_group("response cache (docs: Response cache)"))
    _output_args(run.add_argument_group("output"))
    add_fleet_args(run.add_argument_group(
        "fleet: many pods, one account (docs: Fleet; the fleet extra)"))
    add_connection_args(run)
    run.add_argument("--no-preflight", action="store_true",
                     help="skip the checks before the first request (GET /health, /version, "
                     "/v1/models with the input's models, POST /tokenize with the key)")
    add_sim_group(run, "start the simulator on 127.0.0.1 in-process and send there")


def _input_args(g: Any) -> None:
    g.add_argument("--endpoint", help="bare bodies: route for every line (chat, completions, "
                   "responses, tokenize, detokenize or the path); custom_id becomes line-N")
    g.add_argument("--body-column", metavar="COLUMN",
                   help="INPUT is a Parquet or CSV table whose COLUMN holds each row's request "
                   "body (JSON text or a struct), sent to --endpoint; rows are numbered from 1 "
                   "(a CSV's header is not a row). Without it a table needs a job file's [label] "
                   "table (rows as records)")
    g.add_argument("--id-column", metavar="COLUMN",
                   help="with --body-column: the column that holds each row's custom_id "
                   "(default row-N)")
    g.add_argument("--model", help="fill body.model where a line has none")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="stream every line that does not say (SSE, aggregated into the same body)")
    g.add_argument("--max-line-bytes", type=positive_int, default=None,
                   help="longer lines are failures (default "
                   f"{D.MAX_LINE_BYTES.value // 2**20} MiB)")
    g.add_argument("--shard", type=shard_arg, help="take lines I, I+N, ... (0-based I/N)")


def _fanout_args(g: Any) -> None:
    g.add_argument("--models", metavar="A,B,C",
                   help="send every line to each of these models (whatever model the line "
                   "names), one after another; each writes a standard output directory "
                   "OUTPUT/<model>/ (the name percent-encoded: org/model -> org%%2Fmodel; "
                   "OUTPUT/models.json maps them). One budget covers them all; the exit code "
                   "is the worst. The whole input is checked first: a bad line stops it")
    g.add_argument("--samples", type=positive_int, metavar="N",
                   help="N answers per line (and model), each its own outcome line with "
                   "custom_id#k and \"sample\": k; sample k's body has seed+k on chat and "
                   "completions (seed 0 when the line has none); how they are asked for: "
                   f"--samples-via (default {D.SAMPLES.value})")
    g.add_argument("--samples-via", choices=VIA, default=None,
                   help="n: a line's N samples are one request whose body asks for n=N "
                   "choices (the prompt billed once), on chat and completions not streamed, "
                   "falling back to seed for a server that ignores or refuses n; seed: N "
                   f"requests, one per seed (default {D.SAMPLES_VIA.value})")


def _limit_args(g: Any) -> None:
    g.add_argument("-c", "--concurrency", type=positive_int, default=None,
                   help=f"requests in flight at once (default {D.CONCURRENCY.value})")
    g.add_argument("--rpm", type=positive_float, help="requests per minute of each lane (each "
                   "model; the account with --limit-scope account), when you know the limit "
                   "(without it each lane's pace is learnt from 429s and rate-limit headers)")
    g.add_argument("--tpm", type=positive_float, help="tokens per minute, estimated before "
                   "sending (prompt chars/4 + max_tokens) and corrected from usage")
    g.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="learn the pace from 429s, Retry-After and x-ratelimit headers "
                   "(--concurrency stays the ceiling); on by default when --rpm is not given")
    g.add_argument("--limit-scope", choices=SCOPES, default=None,
                   help="model: each model has its own limits, pause and pace, as "
                   "OpenAI and LiteLLM limit them; account: one for every model, when the "
                   f"account is limited as a whole (default {D.LIMIT_SCOPE.value})")
    g.add_argument("--patience", type=positive_float, default=None, metavar="SECONDS",
                   help="a line refused by the rate limit (429, 503 with Retry-After, 408) is "
                   "sent again until nothing in its lane (its model) has succeeded for this "
                   f"long, then it fails `rejected` (default {D.PATIENCE.value:g})")


def _checkpoint_args(g: Any) -> None:
    g.add_argument("--fsync", choices=["always", "interval", "never"], default=None,
                   help="always: fsync before every send (slowest, survives power loss "
                   "exactly); interval: flush every write, fsync once a second (kill -9 "
                   "loses nothing, power loss at most ~1 s); never: leave it to the OS "
                   f"(default {D.FSYNC.value})")
    g.add_argument("--restart", action="store_true",
                   help="start over: move the old files to OUTPUT/previous-TIME/ (never deleted)")
    g.add_argument("--drain-timeout", type=positive_float, default=None,
                   help="on SIGINT/SIGTERM wait this long for requests in flight (default "
                   f"{D.DRAIN_TIMEOUT.value:g}, inside Kubernetes' 30 s grace period)")
    g.add_argument("--job-id", help="pin the job id that Idempotency-Keys derive from")
    g.add_argument("--work-dir", metavar="DIR",
                   help="with -o URL: where the local copy of the output directory is kept "
                   "(rebuilt from the bucket at each start; env TMBATCH_WORK_DIR; default "
                   "~/.cache/tmbatch/work/NAME-HASH, keyed by the URL)")


def _cache_args(g: Any) -> None:
    g.add_argument("--cache", metavar="PATH",
                   help="an SQLite file of complete answers shared across runs (and processes "
                   "on this machine): a line whose key (server, route, body without stream, "
                   "sample) is in it is answered from it, marked \"cached\": true, sending and "
                   "spending nothing; new complete answers are stored (env TMBATCH_CACHE)")
    g.add_argument("--cache-mode", choices=MODES, default=None,
                   help="read-write: look up and store; read-only: look up, never store; "
                   "write-only: send every line and store (refresh); off: ignore --cache "
                   f"(default {D.CACHE_MODE.value})")


def _output_args(g: Any) -> None:
    g.add_argument("-q", "--quiet", action="store_true", help="no progress, only warnings")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="log debug detail too")
    g.add_argument("--progress-interval", type=positive_float, default=None,
                   help="seconds between progress lines when stderr is not a TTY (default "
                   f"{D.PROGRESS_INTERVAL.value:g})")
    g.add_argument("--ordered", action="store_true",
                   help="when the run finishes, also write results.ordered.jsonl and "
                   "failures.ordered.jsonl in input order (as `tmbatch export`)")
    g.add_argument("--output-format", choices=("jsonl", "parquet", "csv"), default=None,
                   help="parquet or csv: when the run finishes, also write OUTPUT/outcomes.parquet "
                   "or outcomes.csv, one row per outcome in input order with flat columns (as "
                   "`tmbatch export --format`); the JSONL outputs are always written (default "
                   f"{D.OUTPUT_FORMAT.value})")
    g.add_argument("--print-config", action="store_true",
                   help="print every setting as resolved (flag > job file > environment > "
                   "default) and where each came from, the API key only as set/unset; then "
                   "exit 0, sending nothing and leaving the output directory alone. E.g. "
                   "tmbatch run job.toml -c 8 --print-config (one JSON object with "
                   "--log-format json)")
    g.add_argument("--dry-run", action="store_true",
                   help="check everything and send nothing billed: the input read as the run "
                   "reads it (bad lines listed), its tokens and cost at the prices given (as "
                   "`tmbatch estimate`), then `tmbatch doctor` against the server; the output "
                   "directory is not touched. Exit 0 clean, 1 bad lines or warnings, 3 a "
                   "problem that would stop the run")
    add_log_format_arg(g)


def cmd_run(ns: argparse.Namespace) -> int:
    from tmbatch.cli.resolve import resolve_run
    from tmbatch.cli.showconfig import print_config

    # flags > job file > environment > defaults, once: nothing changes `ns` or the config after
    resolved = resolve_run(vars(ns), os.environ,
                           require_key=not (ns.sim or ns.print_config or ns.dry_run))
    config, job = resolved.config, resolved.job
    assert config.connection is not None
    for w in config.connection.warnings:
        log.warning("%s", w)
    if ns.print_config:
        print_config(config, as_json=json_mode())
        return ExitCode.OK
    from tmbatch.cli.dryrun import dry_run, say_estimate

    if ns.dry_run:  # doctor says a missing key; a budget that cannot work is refused below
        if job is None or job.label is None:  # (a labelling job's requests are not made yet)
            _check_budget(config)
        return dry_run(ns, config, job)
    label_runs = []
    labelling = job is not None and job.label is not None
    if labelling and not config.models:  # writes OUTPUT/requests.jsonl (config.input)
        from tmbatch.tools import labels

        label_runs.append(labels.setup(job.path, job.label, config))
    if config.table is not None:  # writes OUTPUT/requests.jsonl (config.input) from its rows
        from tmbatch.inputs.bodies import stage_bodies

        stage_bodies(config.table, config.out_dir, config.restart)
    _check_budget(config)
    from tmbatch.run.fanout import check_not_models

    check_not_models(config)
    if config.models or config.samples > 1:
        code, outs, fanned = _fan_out(ns, config, job if labelling else None)
        label_runs.extend(fanned)
    else:
        say_estimate(config)
        code = run_async(start_run(ns, config))
        outs = [config.out_dir]
    if label_runs:  # labels.jsonl in each model's directory (the worst code of them)
        from tmbatch.run.fanout import worst

        code = worst([label_run.finish(code) for label_run in label_runs])
    if code in (ExitCode.OK, ExitCode.FAILED):
        for out in outs:
            _exports(config, out)
    return code


def _fan_out(ns: argparse.Namespace, config: RunConfig,
             labelling: Any) -> tuple[int, list[Path], list[Any]]:
    """--models/--samples: every model's units staged and checked (a labelling job's
    requests rendered per model), each priced, then the models' runs in turn."""
    from tmbatch.cli.dryrun import say_estimate
    from tmbatch.run.fanout import FanOut

    fan = FanOut(config)
    try:
        fan.stage()  # -o locked, every model's units checked: nothing is sent before this
        parts = [p.config for p in fan.parts]
        label_runs = []
        if labelling is not None:  # each model's requests rendered from the records
            from tmbatch.tools import labels

            label_runs = [labels.setup(labelling.path, labelling.label, p) for p in parts]
        for part in parts:  # each model priced, under a USD budget
            _check_budget(part)
        say_estimate(config, parts)
        assert config.connection is not None
        code = run_async(on_sim_if_asked(ns, config.connection, fan.send))
    finally:
        fan.release()
    return code, [p.out_dir for p in parts], label_runs


def _exports(config: RunConfig, out: Path) -> None:
    """--ordered and --output-format: the extra files a finished run writes."""
    if config.ordered and (out / JOURNAL).exists():
        from tmbatch.tools.export import export_ordered

        export_ordered(out)
    if config.output_format != "jsonl" and (out / JOURNAL).exists():
        from tmbatch.tools.tables import export_table

        dest, rows = export_table(out, config.output_format)
        log.info("%s: %d row(s)", dest, rows)


def _check_budget(config: RunConfig) -> None:
    """A budget smaller than one request, or in dollars without prices, is refused here."""
    if config.budget.limited:  # (what it checks; `tmbatch.spend.estimate` is imported for it only)
        from tmbatch.spend.estimate import check_before_sending

        check_before_sending(config.budget, config.input, endpoint=config.endpoint,
                             model=config.model, stream=config.stream, shard=config.shard,
                             max_line_bytes=config.max_line_bytes)


async def start_run(ns: argparse.Namespace, config: RunConfig) -> int:
    """Local checks first, then the network: the output directory, its lock and the journal
    are settled before the simulator starts (--sim) or preflight sends a byte, and signals
    are handled from the start (a SIGTERM during preflight ends the run, nothing billed).
    `ns`: only the simulator's --sim-* knobs are read from it."""
    assert config.connection is not None
    runner = Runner(config)
    runner.install_signals()
    try:
        runner.prepare()
        return await on_sim_if_asked(ns, config.connection,
                                     lambda s: _preflight_then_send(runner, s))
    finally:
        await runner.close()


async def _preflight_then_send(runner: Runner, settings: Settings) -> int:
    """Preflight stops a doomed run before anything is billed; what it learns (the models
    served) goes to the runner with the settings it sends with, never into the config."""
    config = runner.config
    served = None
    if config.preflight:
        from tmbatch.client.preflight import preflight_for_run

        verdict = await runner.interruptible(
            preflight_for_run(settings, config.input, config.model, config.endpoint))
        if verdict is not None:
            if verdict.stop is not None:
                return verdict.stop
            served = verdict.served  # a line naming another model fails unsent
    return await runner.send(Learnt(settings, served))
