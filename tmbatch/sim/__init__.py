"""Local simulator of the Tensormesh inference API.

The simulator exists so that tmbatch's safety contract can be *measured*: it counts how many
times each billable request was generated (duplicates are money lost), whether clients honour
Retry-After, and which auth headers arrived. It also serves as the credential-free demo backend
and as the benchmark target, so the hot path is kept small: no per-request logging, orjson,
precomputed constant responses, and randomness derived from hashes rather than shared state so
that a given seed yields the same faults regardless of arrival order.

The modules, in the order a request meets them:

- config: SimConfig (what to simulate) and the route constants;
- state: the counters and the accounting that fills them (stats_of);
- replies: JSON replies and OpenAI-shaped error bodies;
- limits: the server-side limits (token bucket with a burst, fixed window, tokens per minute
  charged with usage, a capacity that queues instead of refusing), grouped in a LimitSet with
  the Retry-After windows its refusals announced; pure arithmetic on the `now` they are given,
  so a virtual-time harness can drive them without HTTP;
- gate: X-User-Id routing, the key, admission through the limits, the 429 hints and the
  windows they announce;
- bodies: answer text, token counts, label mode, OpenAI-shaped bodies and SSE events;
- handlers: hooks and the common path of every POST route;
- server: build_app, SimServer, start_sim, run_sim_forever;
- args: the command-line flags shared by `tmbatch sim` and `tmbatch run --sim`.

Callers import from `tmbatch.sim`; the names below are the supported surface.
"""

from __future__ import annotations

from tmbatch.sim.args import add_sim_arguments, sim_config_from_args
from tmbatch.sim.config import (
    ANSWER_PREFIX,
    BILLABLE_ROUTES,
    DUPLICATE_KEYS_CAP,
    GET_ROUTES,
    LIMIT_SCOPES,
    MAX_MODEL_LEN,
    NO_RESPONSE,
    POST_ROUTES,
    REFUSE_STATUSES,
    RETRY_AFTER_FORMATS,
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_DETOKENIZE,
    ROUTE_HEALTH,
    ROUTE_MODELS,
    ROUTE_RESET,
    ROUTE_RESPONSES,
    ROUTE_STATS,
    ROUTE_TOKENIZE,
    ROUTE_VERSION,
    USER_IDS_CAP,
    SimConfig,
)
from tmbatch.sim.server import SimServer, build_app, run_sim_forever, start_sim
from tmbatch.sim.state import STATE_KEY, stats_of

__all__ = [
    "ANSWER_PREFIX",
    "BILLABLE_ROUTES",
    "DUPLICATE_KEYS_CAP",
    "GET_ROUTES",
    "LIMIT_SCOPES",
    "MAX_MODEL_LEN",
    "NO_RESPONSE",
    "POST_ROUTES",
    "REFUSE_STATUSES",
    "RETRY_AFTER_FORMATS",
    "ROUTE_CHAT",
    "ROUTE_COMPLETIONS",
    "ROUTE_DETOKENIZE",
    "ROUTE_HEALTH",
    "ROUTE_MODELS",
    "ROUTE_RESET",
    "ROUTE_RESPONSES",
    "ROUTE_STATS",
    "ROUTE_TOKENIZE",
    "ROUTE_VERSION",
    "STATE_KEY",
    "USER_IDS_CAP",
    "SimConfig",
    "SimServer",
    "add_sim_arguments",
    "build_app",
    "run_sim_forever",
    "sim_config_from_args",
    "start_sim",
    "stats_of",
]
