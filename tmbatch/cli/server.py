"""Commands about the server rather than a run: doctor, models, and the local simulator."""

from __future__ import annotations

import argparse
from typing import Any

from tmbatch.base.exitcodes import ExitCode
from tmbatch.cli.common import (
    add_connection_args,
    add_sim_group,
    on_sim_if_asked,
    run_async,
    settings_from,
    subcommand,
)
from tmbatch.inputs.routes import normalize_endpoint


def add_doctor_parser(sub: Any) -> None:
    doc = subcommand(
        sub, "doctor", "check credentials, base URL and models without billing anything",
        "Show which settings were resolved from where (key redacted), then GET "
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
    add_sim_group(doc, "check against the simulator started on 127.0.0.1 in-process")


def cmd_doctor(ns: argparse.Namespace) -> int:
    from tmbatch.client.doctor import doctor

    settings = settings_from(ns, require_key=False)
    endpoint = normalize_endpoint(ns.endpoint) if ns.endpoint else None
    return run_async(on_sim_if_asked(ns, settings, lambda s: doctor(
        s, ns.input, ns.model, endpoint, as_json=ns.json, sim=ns.sim)))


def add_models_parser(sub: Any) -> None:
    mod = subcommand(sub, "models", "list the models served at the base URL",
                         "GET /v1/models and print one served model name a line.")
    mod.add_argument("--json", action="store_true", help="the server's list as JSON")
    add_connection_args(mod)
    add_sim_group(mod, "list the models of the simulator started on 127.0.0.1 in-process")


def cmd_models(ns: argparse.Namespace) -> int:
    from tmbatch.client.doctor import list_models

    settings = settings_from(ns, require_key=False)
    return run_async(on_sim_if_asked(ns, settings,
                                     lambda s: list_models(s, as_json=ns.json)))


def add_sim_parser(sub: Any) -> None:
    from tmbatch.sim import add_sim_arguments

    sim = subcommand(
        sub, "sim", "serve the local Tensormesh API simulator",
        "Serve every inference route on 127.0.0.1 with OpenAI-shaped bodies, "
        "optional latency, rate limits, 500s and dropped connections; GET /_sim/stats shows "
        "what it received. Example: tmbatch sim --port 8787 --sim-latency 0.1",
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sim.add_argument("--port", type=int, default=8787, help="port to listen on (default 8787)")
    add_sim_arguments(sim)


def cmd_sim(ns: argparse.Namespace) -> int:
    from tmbatch.sim import run_sim_forever, sim_config_from_args

    run_sim_forever(sim_config_from_args(ns), ns.host, ns.port)
    return ExitCode.OK
