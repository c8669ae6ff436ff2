"""`tmbatch run --dry-run`, and the estimate a priced run says as it starts.

A dry run is the three checks a first run needs, in the order they cost: the input read as
`run` reads it (every bad line listed, as `validate` lists them), its tokens and cost (as
`estimate` gives them, at the prices given), then `doctor` against the server (GET /health,
/version, /v1/models, POST /tokenize: nothing billed). No output directory is made or
touched and no billed route is called.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.logs import say
from tmbatch.cli.common import on_sim_if_asked, run_async
from tmbatch.cli.validate import show_bad
from tmbatch.run.config import RunConfig
from tmbatch.spend.usage import money

log = logging.getLogger("tmbatch")


def dry_run(ns: argparse.Namespace, config: RunConfig, job: Any) -> int:
    """Validate, estimate, doctor; exit 3 when doctor finds a problem that would stop the
    run, 1 for bad lines or doctor's warnings, 0 when the run would start clean."""
    from tmbatch.client.doctor import doctor
    from tmbatch.spend.estimate import DEFAULT_EXPECTED_OUTPUT, estimate

    assert config.connection is not None
    source, label = config.input, None
    if job is not None and job.label is not None:  # the records, rendered as the run would
        source, label = str(config.records), (job.path, job.label)
    prices = config.budget.prices
    model = config.model or (config.models[0] if config.models else None)  # --models fill it
    est = estimate(source, endpoint=config.endpoint, model=model, label=label,
                   on_bad=lambda item: show_bad(source, item, False))
    print(est.render(prices, DEFAULT_EXPECTED_OUTPUT, None))
    print()
    scan = None if source == "-" or label is not None else source  # stdin is read once
    checked = run_async(on_sim_if_asked(ns, config.connection, lambda s: doctor(
        s, scan, config.model, config.endpoint, sim=bool(ns.sim))))
    code = ExitCode.FATAL if checked == ExitCode.FATAL else \
        ExitCode.FAILED if checked or est.bad else ExitCode.OK
    verdict = {ExitCode.OK: "the run would start", ExitCode.FAILED:
               "the run would start, with the bad lines or warnings above",
               ExitCode.FATAL: "the run would be refused: see the checks above"}[code]
    msg = (f"dry run: {verdict}; nothing was sent to a billed route and "
           f"{Path(config.out_dir)} was not touched")
    say("dry_run", msg, exit_code=int(code), bad_lines=est.bad, doctor_exit=int(checked))
    return code


def say_estimate(config: RunConfig, parts: Sequence[RunConfig] = ()) -> None:
    """With prices, a run says what the input should cost as it starts (the whole input,
    as `tmbatch estimate` counts it: expected and worst case); `parts`: with --models or
    --samples, each model's staged units, added up."""
    prices = config.budget.prices
    if not prices or config.input == "-" or config.quiet:
        return
    from tmbatch.spend.estimate import DEFAULT_EXPECTED_OUTPUT, estimate

    total: dict[str, Any] = {}
    for c in parts or (config,):
        est = estimate(c.input, endpoint=c.endpoint, model=c.model)
        _add(total, est.as_json(prices, DEFAULT_EXPECTED_OUTPUT, None)["total"])
    cost = total["cost_usd"] or {}
    excludes = cost.get("excludes_models") or []
    note = f" (excludes {', '.join(excludes)}: no price)" if excludes else ""
    say("estimate", f"estimate: {total['lines']:,} billed line(s) of the whole input, "
        f"~{total['prompt_tokens']:,} prompt tokens and up to {total['output_ceiling']:,} "
        f"output; cost ~{money(cost.get('expected', 0.0))} expected, "
        f"{money(cost.get('worst', 0.0))} at most{note} (`tmbatch estimate` for the table)",
        **total)


def _add(total: dict[str, Any], more: dict[str, Any]) -> None:
    """One model's estimate added to the others' (numbers summed, models unpriced joined)."""
    if not total:
        total.update(more)
        return
    for key, value in more.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
    cost, extra = total.get("cost_usd"), more.get("cost_usd")
    if cost and extra:
        total["cost_usd"] = {k: (sorted(set(v) | set(extra.get(k) or [])) if isinstance(v, list)
                                 else v + (extra.get(k) or 0)) for k, v in cost.items()}
