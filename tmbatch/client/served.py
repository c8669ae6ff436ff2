"""What the server serves, as far as the run knows: lines it cannot serve fail alone.

A 404 means "not here" for one route and model, not for the whole file: a file mixing chat
with a route the server lacks (llmock has no /v1/completions, xpyd-sim no /v1/responses)
must fail those lines and run the rest, and stop again on no resume. So the judgement is per
(route, model), and only while nothing on that pair has succeeded: after `judge_after` 404s
its remaining lines fail `permanent` without being sent. Which of the two is missing is told
by what did succeed: the route with another model (the model is not served), or the model on
another route (the route is not).

Preflight's GET /v1/models list, when there is one, settles models at once: a line naming a
model that is not on it fails `permanent` (model_not_served) unsent, wherever it is in the
file, as the lines preflight scanned do.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from tmbatch.client.preflight import unknown_model_message

log = logging.getLogger("tmbatch")

Key = tuple[str, str | None]  # (route, model); None when a line names no model


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a line is not sent: its failure's code and message."""

    code: str
    message: str


@dataclass
class ServedCheck:
    served: tuple[str, ...] | None = None  # GET /v1/models' list; None: not known
    judge_after: int = 8
    _served: frozenset[str] | None = None
    _ok: set[Key] = field(default_factory=set)
    _ok_routes: set[str] = field(default_factory=set)
    _ok_models: set[str | None] = field(default_factory=set)
    _not_found: Counter[Key] = field(default_factory=Counter)
    _dead: dict[Key, str] = field(default_factory=dict)  # the last 404's message
    _unlisted: dict[str, str] = field(default_factory=dict)  # model -> message, warned once

    def __post_init__(self) -> None:
        if self.served is not None:
            self._served = frozenset(self.served)

    def refusal(self, route: str, model: object, line: int) -> Refusal | None:
        """Why a line on `route` naming `model` must fail unsent; None: send it."""
        name = model if isinstance(model, str) else None
        if self._served is not None and name is not None and name not in self._served:
            return Refusal("model_not_served", self._unlisted_message(name, line))
        key = (route, name)
        if key in self._dead:
            return self._judged(key)
        return None

    def succeeded(self, route: str, model: object) -> None:
        name = model if isinstance(model, str) else None
        key = (route, name)
        if key in self._ok:
            return
        self._ok.add(key)
        self._ok_routes.add(route)
        self._ok_models.add(name)

    def not_found(self, route: str, model: object, message: str) -> None:
        """Count a 404; at `judge_after` of them, with nothing on the pair ever answered, its
        remaining lines are refused (logged once, with what the server said)."""
        key = (route, model if isinstance(model, str) else None)
        if key in self._ok or key in self._dead:
            return
        self._not_found[key] += 1
        if self._not_found[key] < self.judge_after:
            return
        self._dead[key] = message
        log.warning("%s; the rest runs", self._judged(key).message,
                    extra={"event": "not_served", "route": route, "model": key[1]})

    def _judged(self, key: Key) -> Refusal:
        route, model = key
        what = f"POST {route}" + (f" with model {model!r}" if model is not None else "")
        said = f"the first {self._not_found[key]} got 404 ({self._dead[key]}) and none succeeded"
        if route in self._ok_routes:
            return Refusal("model_not_served", f"{what}: {said}, while {route} answers other "
                           "models: the model is not served here (`tmbatch models` lists "
                           "the served ones); not sent")
        if model in self._ok_models:
            return Refusal("route_not_served", f"{what}: {said}, while the model answers on "
                           f"other routes: the server has no {route}; not sent")
        return Refusal("not_served", f"{what}: {said}: this server does not serve the model "
                       "or the route (`tmbatch models` lists served models); not sent")

    def _unlisted_message(self, model: str, line: int) -> str:
        message = self._unlisted.get(model)
        if message is None:
            message = unknown_model_message(model, list(self.served or ())) + "; not sent"
            self._unlisted[model] = message
            log.warning("line %d: %s; every line naming it fails `permanent` "
                        "(model_not_served), the rest runs", line, message,
                        extra={"event": "model_not_served", "model": model})
        return message
