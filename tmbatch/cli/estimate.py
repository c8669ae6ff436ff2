"""`tmbatch estimate`: tokens and cost of an input (or a job file), sending nothing billable."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.config import Settings
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.logs import add_log_format_arg, say
from tmbatch.cli import common
from tmbatch.cli.validate import show_bad
from tmbatch.inputs.routes import normalize_endpoint
from tmbatch.policy import AttemptFailed

log = logging.getLogger("tmbatch")

EXAMPLES = """examples:
  tmbatch estimate input.jsonl --price tm-small=0.20:0.60
  tmbatch estimate input.jsonl --prices prices.toml --json
  tmbatch estimate jobs/label-sentiment.toml --tokenize --sim   # compare with /tokenize
"""


def add_estimate_parser(sub: Any) -> None:
    est = common.subcommand(
        sub, "estimate", "tokens and cost of an input before sending it (nothing billable)",
        "Per model and in total: lines, estimated prompt tokens (the estimate --tpm and "
        "budgets use), the output ceiling (max_tokens / max_completion_tokens / "
        "max_output_tokens, or the default) and, at the prices you give, the cost as a range. "
        "Bad lines are listed as `validate` lists them. Exit 0 when every line is good, 1 when "
        "some are bad, 2 when the input cannot be read, 3 when /tokenize refuses the key.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
    )
    est.add_argument("input", help="JSONL file (- reads stdin), or a job file NAME.toml")
    est.add_argument("--endpoint", help="as for run: the route of bare request bodies")
    est.add_argument("--model", help="as for run: the model of lines that name none")
    est.add_argument("--json", action="store_true", help="one JSON object per bad line, then "
                     "the estimate as one JSON object, on stdout")
    est.add_argument("--expected-output", type=_share, default=None, metavar="SHARE",
                     help="the share of each output ceiling the expected cost assumes answers "
                     "use (0 to 1, default 0.5); the worst case assumes all of it")
    est.add_argument("--tokenize", nargs="?", type=common.positive_int, const=20, default=None,
                     metavar="N", help="ask the server's /tokenize (not billed) for N sampled "
                     "lines (default 20) and say how close the estimate is")
    common.add_price_args(est.add_argument_group("prices (USD per million tokens)"))
    add_log_format_arg(est)
    common.add_connection_args(est)
    common.add_sim_group(est, "--tokenize against the in-process simulator")


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1")
    return v


def cmd_estimate(ns: argparse.Namespace) -> int:
    from tmbatch.spend.estimate import DEFAULT_EXPECTED_OUTPUT, estimate

    ns, label = _from_job(ns)
    if label is None:
        from tmbatch.inputs.tables import refuse_bare_table

        refuse_bare_table(ns.input, "estimate")
    prices = common.budget_spec_from(ns).prices
    settings = _settings(ns) if ns.tokenize else None  # a missing key stops here, not later
    endpoint = normalize_endpoint(ns.endpoint) if ns.endpoint else None
    est = estimate(ns.input, endpoint=endpoint, model=ns.model, sample=ns.tokenize or 0,
                   label=label, on_bad=lambda item: show_bad(ns.input, item, ns.json))
    share = DEFAULT_EXPECTED_OUTPUT if ns.expected_output is None else ns.expected_output
    missing = prices.missing(est.billed_models())
    if prices and missing:
        log.warning("no price for %s: cost figures exclude %s", ", ".join(missing),
                    "it" if len(missing) == 1 else "them")
    check = None
    code = ExitCode.FAILED if est.bad else ExitCode.OK
    if ns.tokenize:
        try:
            check = common.run_async(_tokenize(ns, settings, est.sample))
        except AttemptFailed as exc:
            msg = (f"/tokenize refused the key (HTTP {exc.status} {exc.message}); the estimate "
                   "above is not compared")
            say("tokenize_refused", msg, text=f"tmbatch: {msg}", level=logging.ERROR)
            code = ExitCode.FATAL
    if ns.json:
        sys.stdout.buffer.write(orjson.dumps(est.as_json(prices, share, check)) + b"\n")
    else:
        print(est.render(prices, share, check))
    return code


def _from_job(ns: argparse.Namespace) -> tuple[argparse.Namespace,
                                                 tuple[Path, dict[str, Any]] | None]:
    """A job file gives the input, endpoint, model and [prices]; flags win: a new namespace
    with them (the one parsed is not changed). Its [label] table makes the requests from
    records, as `run` would."""
    from tmbatch.cli.jobfile import is_job_file, load_job

    if not is_job_file(ns.input):
        return ns, None
    job = load_job(ns.input)
    values = dict(vars(ns))
    for dest in ("input", "endpoint", "model", "job_prices"):
        if dest in job.values and (dest == "input" or values.get(dest) is None):
            values[dest] = job.values[dest]
    values["job_name"] = job.path.name
    label = (job.path, job.label) if job.label is not None else None
    return argparse.Namespace(**values), label


def _settings(ns: argparse.Namespace) -> Settings:
    settings = common.settings_from(ns, require_key=not ns.sim)
    for w in settings.warnings:
        log.warning("%s", w)
    return settings


async def _tokenize(ns: argparse.Namespace, settings: Any, sample: list[Any]) -> Any:
    from tmbatch.spend.estimate import tokenize_sample

    if not ns.sim:
        return await tokenize_sample(settings, sample)
    from tmbatch.sim import sim_config_from_args, start_sim

    server = await start_sim(sim_config_from_args(ns))
    try:
        local: Settings = dataclasses.replace(settings, base_url=server.url, ca_bundle=None)
        return await tokenize_sample(local, sample)
    finally:
        await server.stop()
