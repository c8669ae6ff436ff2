"""`tmbatch run`: everything before the runner takes over, and the labels/export after it."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from tmbatch.base.config import ConfigError, Settings, check_model
from tmbatch.base.exitcodes import ExitCode, help_text
from tmbatch.base.logs import add_log_format_arg
from tmbatch.cli.common import (
    add_budget_args,
    add_connection_args,
    add_sim_group,
    budget_spec_from,
    on_sim_if_asked,
    positive_float,
    positive_int,
    run_async,
    settings_from,
    shard_arg,
    subcommand,
)
from tmbatch.inputs.reader import normalize_endpoint
from tmbatch.limits import SCOPES
from tmbatch.run.options import RunOptions
from tmbatch.run.runner import Runner, out_dir_of

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
                     "--endpoint; - reads stdin (not resumable); or a job file NAME.toml "
                     "(flags override it)")
    run.add_argument("-o", "--output", help="output directory (default: INPUT's name + .out)")
    _input_args(run.add_argument_group("input"))
    _limit_args(run.add_argument_group("limits"))
    add_budget_args(run.add_argument_group("budget and prices (README: Cost and budgets)"))
    _checkpoint_args(run.add_argument_group("checkpoint"))
    _output_args(run.add_argument_group("output"))
    add_connection_args(run)
    run.add_argument("--no-preflight", action="store_true",
                     help="skip the checks before the first request (GET /health, /version, "
                     "/v1/models with the input's models, POST /tokenize with the key)")
    add_sim_group(run, "start the simulator on 127.0.0.1 in-process and send there")


def _input_args(g: Any) -> None:
    g.add_argument("--endpoint", help="bare bodies: route for every line (chat, completions, "
                   "responses, tokenize, detokenize or the path); custom_id becomes line-N")
    g.add_argument("--model", help="fill body.model where a line has none")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="stream every line that does not say (SSE, aggregated into the same body)")
    g.add_argument("--max-line-bytes", type=positive_int, default=None,
                   help="longer lines are failures (default 32 MiB)")
    g.add_argument("--shard", type=shard_arg, help="take lines I, I+N, ... (0-based I/N)")


def _limit_args(g: Any) -> None:
    g.add_argument("-c", "--concurrency", type=positive_int, default=None,
                   help="requests in flight at once (default 64)")
    g.add_argument("--rpm", type=positive_float, help="requests per minute of each lane (each "
                   "model; the account with --limit-scope account), when you know the limit "
                   "(without it each lane's pace is learnt from 429s and rate-limit headers)")
    g.add_argument("--tpm", type=positive_float, help="tokens per minute, estimated before "
                   "sending (prompt chars/4 + max_tokens) and corrected from usage")
    g.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="learn the pace from 429s, Retry-After and x-ratelimit headers "
                   "(--concurrency stays the ceiling); on by default when --rpm is not given")
    g.add_argument("--limit-scope", choices=SCOPES, default=None,
                   help="model (default): each model has its own limits, pause and pace, as "
                   "OpenAI and LiteLLM limit them; account: one for every model, when the "
                   "account is limited as a whole")
    g.add_argument("--patience", type=positive_float, default=None, metavar="SECONDS",
                   help="a line refused by the rate limit (429, 503 with Retry-After, 408) is "
                   "sent again until nothing in its lane (its model) has succeeded for this "
                   "long, then it fails `rejected` (default 600)")


def _checkpoint_args(g: Any) -> None:
    g.add_argument("--fsync", choices=["always", "interval", "never"], default=None,
                   help="always: fsync before every send (slowest, survives power loss "
                   "exactly); interval: flush every write, fsync once a second (default; kill -9 "
                   "loses nothing, power loss at most ~1 s); never: leave it to the OS")
    g.add_argument("--restart", action="store_true",
                   help="start over: move the old files to OUTPUT/previous-TIME/ (never deleted)")
    g.add_argument("--drain-timeout", type=positive_float, default=None,
                   help="on SIGINT/SIGTERM wait this long for requests in flight (default 25, "
                   "inside Kubernetes' 30 s grace period)")
    g.add_argument("--job-id", help="pin the job id that Idempotency-Keys derive from")


def _output_args(g: Any) -> None:
    g.add_argument("-q", "--quiet", action="store_true", help="no progress, only warnings")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="log debug detail too")
    g.add_argument("--progress-interval", type=positive_float, default=10.0,
                   help="seconds between progress lines when stderr is not a TTY (default 10)")
    g.add_argument("--ordered", action="store_true",
                   help="when the run finishes, also write results.ordered.jsonl and "
                   "failures.ordered.jsonl in input order (as `tmbatch export`)")
    add_log_format_arg(g)


def cmd_run(ns: argparse.Namespace) -> int:
    from tmbatch.cli.jobfile import prepare_run

    job = prepare_run(ns, os.environ)  # job.toml values, shard from env, defaults
    settings = settings_from(ns, require_key=not ns.sim)
    for w in settings.warnings:
        log.warning("%s", w)
    endpoint = normalize_endpoint(ns.endpoint) if ns.endpoint else None
    if ns.model:
        problem = check_model(ns.model, "--model")
        if problem:
            raise ConfigError(problem)
    out = out_dir_of(ns.input, ns.output)
    label_run = None
    if job is not None and job.label is not None:  # ns.input becomes OUT/requests.jsonl
        from tmbatch.tools import labels

        label_run = labels.setup(job.path, job.label, ns, out)
    opts = RunOptions(
        input=ns.input, out_dir=out, endpoint=endpoint, model=ns.model, stream=ns.stream,
        concurrency=ns.concurrency, rpm=ns.rpm, tpm=ns.tpm, fsync=ns.fsync,
        restart=ns.restart, drain_timeout=ns.drain_timeout, job_id=ns.job_id, shard=ns.shard,
        quiet=ns.quiet, progress_interval=ns.progress_interval,
        max_line_bytes=ns.max_line_bytes, adaptive=ns.adaptive, patience=ns.patience,
        limit_scope=ns.limit_scope, budget=budget_spec_from(ns),
    )
    if opts.budget.limited:  # (what it checks; `tmbatch.spend.estimate` is imported for it only)
        from tmbatch.spend.estimate import check_before_sending

        check_before_sending(opts.budget, opts.input, endpoint=endpoint, model=ns.model,
                             stream=ns.stream, shard=ns.shard,
                             max_line_bytes=ns.max_line_bytes)
    code = run_async(start_run(ns, opts, settings, preflight=not ns.no_preflight))
    if label_run is not None:
        code = label_run.finish(code)
    if ns.ordered and code in (ExitCode.OK, ExitCode.FAILED):
        from tmbatch.tools.export import export_ordered

        export_ordered(out)
    return code


async def start_run(ns: argparse.Namespace, opts: RunOptions, settings: Settings, *,
                    preflight: bool) -> int:
    """Local checks first, then the network: the output directory, its lock and the journal
    are settled before the simulator starts (--sim) or preflight sends a byte, and signals
    are handled from the start (a SIGTERM during preflight ends the run, nothing billed)."""
    runner = Runner(opts, settings)
    runner.install_signals()
    try:
        runner.prepare()
        return await on_sim_if_asked(ns, settings,
                                     lambda s: _preflight_then_send(runner, s, preflight))
    finally:
        await runner.close()


async def _preflight_then_send(runner: Runner, settings: Settings, preflight: bool) -> int:
    """Preflight stops a doomed run before anything is billed."""
    runner.settings = settings
    opts = runner.opts
    if preflight:
        from tmbatch.client.preflight import preflight_for_run

        verdict = await runner.interruptible(
            preflight_for_run(settings, opts.input, opts.model, opts.endpoint))
        if verdict is not None:
            if verdict.stop is not None:
                return verdict.stop
            opts.served_models = verdict.served  # a line naming another model fails unsent
    return await runner.send()
