"""The routes a request line may name, and how a user may name them.

The reader checks each line's `url` against this table, and `--endpoint` (run, estimate,
validate, server, a job file) takes a route by any of its names.
"""

from __future__ import annotations

# route -> idempotent?  Generation routes are billed once accepted.
ROUTES: dict[str, bool] = {
    "/v1/chat/completions": False,
    "/v1/completions": False,
    "/v1/responses": False,
    "/tokenize": True,
    "/detokenize": True,
}
ALIASES = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "tokenize": "/tokenize",
    "detokenize": "/detokenize",
}
STREAMABLE = {"/v1/chat/completions", "/v1/completions", "/v1/responses"}


def normalize_endpoint(value: str) -> str:
    """`chat`, `/v1/chat/completions` and `v1/chat/completions` all name one route."""
    v = value.strip()
    if v in ALIASES:
        return ALIASES[v]
    if not v.startswith("/"):
        v = "/" + v
    if v in ROUTES:
        return v
    raise ValueError(
        f"unknown endpoint {value!r}; expected one of "
        + ", ".join(list(ALIASES) + list(ROUTES))
    )
