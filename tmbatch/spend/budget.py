"""The spend guard: know what a job spent, and never admit an attempt past its budget.

Each billed attempt takes a `reservation.Reservation` (its worst case) before it is sent. It
is admitted only if spent + reserved + this attempt stays within every budget
(`--budget-tokens`, `--budget-usd`). If it does not fit while other attempts are in flight it
waits for them, since their answers usually cost less than was reserved; if it could not fit
even after every one of them, the budget is reached: nothing more is admitted, the attempts in
flight finish, unsent lines stay pending, and the run exits 6. What an answer, a failure or an
attempt's end counts is the reservation's to say; the books (spent, reserved, in flight) and
what answers teach the next estimates are kept here.

The job's spend survives crashes and resumes through the journal: each journal write after
an attempt ended carries a snapshot of the job's cumulative spend (`journal.SpendRecord`),
after the outcomes it counts, and each dispatch record (with or without a budget) carries
its reservation, so on resume an answered attempt counts its usage and only an attempt a
crash cut off counts its worst case (see `journal.spend_after`).

/tokenize and /detokenize are not billed and never counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tmbatch.base.stop import Stop
from tmbatch.inputs.reader import Request
from tmbatch.journal.journal import SpendRecord
from tmbatch.spend.prices import Prices
from tmbatch.spend.reservation import FREE, Hold, Reservation
from tmbatch.spend.tokens import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    ceiling,
    choices,
    output_cap,
    prompt_tokens,
)
from tmbatch.spend.usage import Tokens, money, short

log = logging.getLogger("tmbatch")

FACTOR_MAX = 50.0  # a prompt estimate is never scaled up more than this
WAIT_POLL = 0.5  # a waiting attempt looks at the stop state at least this often


@dataclass
class BudgetSpec:
    """What the user asked for: the limits and the prices (for `run`, `resend`, `estimate`)."""

    tokens: int | None = None
    usd: float | None = None
    prices: Prices = field(default_factory=Prices)

    @property
    def limited(self) -> bool:
        return self.tokens is not None or self.usd is not None

    def describe(self) -> str:
        parts = []
        if self.tokens is not None:
            parts.append(f"{self.tokens:,} tokens")
        if self.usd is not None:
            parts.append(money(self.usd))
        return " and ".join(parts) or "none"

    def record(self) -> dict[str, Any]:
        """The run's journal record of its limits and prices (status and report read it)."""
        return {"e": "budget", "t": round(time.time(), 3), "tokens": self.tokens,
                "usd": self.usd, "prices": self.prices.as_json()}


class Budget:
    """The job's spend (earlier runs + this one), this run's reservations, and the limits."""

    def __init__(self, spec: BudgetSpec | None = None, stop: Stop | None = None,
                 prior: dict[str, list[int]] | None = None, prior_unknown: int = 0) -> None:
        self.spec = spec or BudgetSpec()
        self.enforcing = self.spec.limited  # a plain field: read on every attempt
        self.prices = self.spec.prices
        self._priced = bool(self.prices)  # read on every answer: Prices.__bool__ is a call
        self.stop = stop
        self.spent: dict[str, Tokens] = {m: Tokens.of(v) for m, v in (prior or {}).items()}
        # what the earlier runs spent: this run's share is `spent` less this (see `this_run`),
        # so an answer is counted in one book, not two
        self._before: dict[str, Tokens] = {m: Tokens.of(v) for m, v in (prior or {}).items()}
        self.unknown = prior_unknown  # attempts whose spend nobody can know (see journal)
        self.spent_tokens = sum(t.total for t in self.spent.values())
        self.spent_usd = sum(self._cost(m, t) for m, t in self.spent.items())
        self.reserved_tokens = 0
        self.reserved_usd = 0.0
        self.reserved_by_model: dict[str, list[float]] = {}  # model -> [tokens, usd]
        self.held = 0
        self._in_flight: dict[str, list[int]] = {}  # sent, unanswered: model -> [p, out, n]
        self._in_flight_unknown = 0
        self.prompt_factor = 1.0
        self._est_sum = 0
        self._act_sum = 0
        self.uncapped_output = DEFAULT_MAX_OUTPUT_TOKENS
        self.unpriced: set[str] = {m for m in self.spent if self.prices.get(m) is None}
        self.reached: str | None = None
        self.overrun_warned = False
        self._waiters: list[asyncio.Future[None]] = []
        self._notify: Callable[[], None] | None = None  # the writer's `spend_changed`
        self._dirty = False
        self.shared: Any = None  # `spend.shared.RedisBudget` with --redis (the job's books)

    @classmethod
    def for_job(cls, spec: BudgetSpec, stop: Stop, resume: Any) -> Budget:
        """This run's budget, counting what the job's earlier runs spent (from the journal)."""
        if resume is None:
            return cls(spec, stop)
        if resume.spend is None and spec.limited:
            log.warning("this job's earlier runs were made by a tmbatch that did not journal "
                        "spend: the budget counts only what is spent from now on")
        if resume.spend_unknown and spec.limited:
            log.warning("%d attempt(s) of an earlier run without a budget were cut off with no "
                        "estimate of their spend: the budget cannot count them",
                        resume.spend_unknown)
        return cls(spec, stop, resume.spend, resume.spend_unknown)

    # -- the journal ----------------------------------------------------------------------------
    def start(self, writer: Any) -> None:
        """Journal the run's limits and prices and a first snapshot (so a resume of this
        journal knows spend is recorded from here on), and a last snapshot at close."""
        if self.enforcing or self.prices:
            writer.header(self.spec.record())
        writer.spend(self.snapshot())
        self._notify = writer.spend_changed
        writer.spend_snapshot = self.due
        writer.before_close.append(self._touch)

    def snapshot(self) -> SpendRecord:
        """The job's spend now: settled (usage, or worst case of a failure that may have been
        billed), in flight (worst case), and attempts of unknown spend (an older journal's)."""
        return SpendRecord(
            round(time.time(), 3), {m: t.as_list() for m, t in self.spent.items()},
            {m: list(v) for m, v in self._in_flight.items() if v[2]},
            self.unknown + self._in_flight_unknown,
        )

    def due(self) -> SpendRecord | None:
        """The writer asks at each write: a snapshot when an attempt ended since the last."""
        if not self._dirty:
            return None
        self._dirty = False
        return self.snapshot()

    def _touch(self) -> None:
        """An attempt ended: the journal's next write must carry a snapshot."""
        if not self._dirty:
            self._dirty = True
            if self._notify is not None:
                self._notify()

    # -- admission ------------------------------------------------------------------------------
    def track(self, req: Request) -> Hold:
        """Without a budget only spend is counted: nothing to wait for (the hot path: no
        coroutine, and the sender calls this instead of `reserve`)."""
        if req.idempotent:
            return FREE
        model = req.body.get("model")
        return Reservation(self, model if isinstance(model, str) else "", req.body)

    async def reserve(self, req: Request) -> Hold | None:
        """Claim this attempt's worst case, waiting while attempts in flight may make room;
        None when the budget is reached (the run's stop is then set)."""
        res = self.track(req)
        if not self.enforcing or not isinstance(res, Reservation):
            return res
        res.estimate()
        while True:
            if self.reached is not None or (self.stop is not None and self.stop.stopping):
                return None
            final, waiting = await self._judge(res, req)
            if final is not None:
                self._reach(final)
                return None
            if not waiting:
                break
            await self._wait()
            self._estimate(res)  # answers that came meanwhile may have taught the estimate
        self.held += 1
        res.held = True
        self.reserved_tokens += res.tokens
        self.reserved_usd += res.usd
        by = self.reserved_by_model.setdefault(res.model, [0.0, 0.0])
        by[0] += res.tokens
        by[1] += res.usd
        return res

    async def _judge(self, res: Reservation, req: Request) -> tuple[str | None, bool]:
        """This shard's books against its share, or with --redis the job's books in Redis
        against the whole budget (one atomic claim; the static share while Redis is down)."""
        shared = self.shared
        if shared is None:
            return self._room(res, req)
        if self.spec.usd is not None and self.prices.get(res.model) is None:
            return self._room(res, req)  # the error naming the missing price
        others = await shared.claim(self, res.tokens, res.usd)
        if not shared.up:
            return self._room(res, req)
        if others is None:
            return None, False  # taken in Redis: hold it here too, at once
        return self._room(res, req, (
            self.spent_tokens + others.spent_tokens, self.reserved_tokens + others.reserved_tokens,
            self.spent_usd + others.spent_usd, self.reserved_usd + others.reserved_usd,
            shared.tokens, shared.usd), " (the job's, shared by its shards)")

    def _room(self, res: Reservation, req: Request,
              books: tuple[float, float, float, float, int | None, float | None] | None = None,
              whose: str = "") -> tuple[str | None, bool]:
        """(why the budget is reached, or None; whether to wait for attempts in flight).
        `books`: spent and reserved tokens and USD and the limits, when not this process's."""
        if books is None:
            books = (self.spent_tokens, self.reserved_tokens, self.spent_usd,
                     self.reserved_usd, self.spec.tokens, self.spec.usd)
        spent_t, reserved_t, spent_usd, reserved_usd, tokens, usd = books
        waiting = False
        if tokens is not None:
            if spent_t + res.tokens > tokens:
                return (f"spent {spent_t:,.0f} of --budget-tokens {tokens:,}{whose}; the "
                        f"next request (line {req.line}) may use up to {res.tokens:,}"), False
            waiting = spent_t + reserved_t + res.tokens > tokens
        if usd is not None:
            if self.prices.get(res.model) is None:
                return (f"model {res.model!r} (line {req.line}) has no price, so --budget-usd "
                        f"cannot hold it: give --price {res.model}=IN:OUT (USD per million "
                        "tokens) and run again"), False
            if spent_usd + res.usd > usd:
                return (f"spent {money(spent_usd)} of --budget-usd {usd:,.4g}{whose}; the "
                        f"next request (line {req.line}) may cost up to {money(res.usd)}"), False
            waiting = waiting or spent_usd + reserved_usd + res.usd > usd
        return None, waiting

    def changed(self) -> None:
        """An attempt settled or gave its reservation back: the job's books in Redis follow."""
        if self.shared is not None:
            self.shared.publish(self)

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait((fut,), timeout=WAIT_POLL)
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    def _reach(self, why: str) -> None:
        self.reached = why
        if self.stop is not None and self.stop.on_budget(why):
            log.warning("budget reached: %s; no new requests, %d in flight finish",
                        why, self.held, extra={"event": "budget_reached"})
        self._wake()

    # -- estimates and what answers teach -------------------------------------------------------
    def _estimate(self, res: Reservation) -> None:
        body = res.body
        res.raw_prompt = prompt_tokens(body)
        res.prompt = math.ceil(res.raw_prompt * self.prompt_factor)
        cap, n = output_cap(body), choices(body)  # each read once (`output_ceiling`'s too)
        res.capped = cap is not None
        res.output = ceiling(cap, n)
        if cap is None:  # no cap of its own: the most an uncapped answer has used so far
            res.output = max(res.output, self.uncapped_output * n)
        price = self.prices.get(res.model)
        res.usd = price.cost(res.prompt, res.output) if price is not None else 0.0

    def _learn(self, res: Reservation, prompt: int, completion: int) -> None:
        """Later worst cases follow what usage says: the prompt estimate's bias (a ratio of
        sums, never below 1) and the longest answer of a line without an output cap."""
        if res.raw_prompt > 0:
            self._est_sum += res.raw_prompt
            self._act_sum += prompt
            self.prompt_factor = min(FACTOR_MAX, max(1.0, self._act_sum / self._est_sum))
        if not res.capped:
            self.uncapped_output = max(self.uncapped_output,
                                       math.ceil(completion / choices(res.body)))
        if res.held and prompt + completion > res.tokens and not self.overrun_warned:
            self.overrun_warned = True
            log.warning("an answer used %d tokens, more than the %d reserved for it: the prompt "
                        "estimate is low for this input (`tmbatch estimate --tokenize` measures "
                        "it); later reservations are scaled to the usage seen (x%.2f)",
                        prompt + completion, res.tokens, self.prompt_factor)

    # -- bookkeeping ----------------------------------------------------------------------------
    def _in_flight_add(self, res: Reservation, sign: int) -> None:
        """Sent and unanswered: what a crash now would leave of unknown outcome."""
        if not res.known:
            self._in_flight_unknown += sign
            return
        v = self._in_flight.get(res.model)
        if v is None:
            v = self._in_flight[res.model] = [0, 0, 0]
        v[0] += sign * res.prompt
        v[1] += sign * res.output
        v[2] += sign

    def _release(self, res: Reservation) -> None:
        res.held = False
        self.held -= 1
        by = self.reserved_by_model[res.model]
        if self.held == 0:  # no float drift left behind
            self.reserved_tokens, self.reserved_usd = 0, 0.0
            for v in self.reserved_by_model.values():
                v[0], v[1] = 0.0, 0.0
        else:
            self.reserved_tokens -= res.tokens
            self.reserved_usd -= res.usd
            by[0] -= res.tokens
            by[1] -= res.usd
        self._wake()

    def _count(self, res: Reservation, prompt: int, completion: int, cached: int) -> None:
        model = res.model
        t = self.spent.get(model)
        if t is None:
            t = self.spent[model] = Tokens()
        t.add(prompt, completion, cached)
        self.spent_tokens += prompt + completion
        if self._priced:
            price = self.prices.get(model)
            if price is not None:
                self.spent_usd += price.cost(prompt, completion, cached)
            elif model not in self.unpriced:
                self.unpriced.add(model)
                log.warning("no price for model %r: cost figures exclude it (add --price "
                            "%s=IN:OUT, USD per million tokens)", model, model)

    def this_run(self, model: str) -> Tokens:
        """What this run spent on `model`: the job's spend less the earlier runs'."""
        t = self.spent.get(model, Tokens())
        before = self._before.get(model)
        if before is None:
            return Tokens(t.prompt, t.completion, t.cached, t.requests)
        return Tokens(t.prompt - before.prompt, t.completion - before.completion,
                      t.cached - before.cached, t.requests - before.requests)

    def worst_case(self, req: Request) -> Reservation:
        """The reservation `req` would take now (not held): its worst case."""
        model = req.body.get("model")
        res = Reservation(self, model if isinstance(model, str) else "", req.body)
        res.estimate()
        return res

    def _cost(self, model: str, t: Tokens) -> float:
        price = self.prices.get(model)
        return 0.0 if price is None else price.cost(t.prompt, t.completion, t.cached)

    # -- what people and scripts see ------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spent_tokens": self.spent_tokens}
        if self.prices:
            out["spent_usd"] = round(self.spent_usd, 6)
        if self.spec.tokens is not None:
            out["budget_tokens"] = self.spec.tokens
        if self.spec.usd is not None:
            out["budget_usd"] = self.spec.usd
        return out

    def progress_text(self) -> str:
        """`12.3k tok / 50k tok, $0.004123 / $0.05` spent (of the budget), dollars to four
        significant digits (`usage.money`): progress line and bar."""
        return self._spent_against(lambda n: f"{short(n)} tok", money, " / ")

    def _spent_against(self, tokens: Callable[[float], str], usd: Callable[[float], str],
                       of: str) -> str:
        text = tokens(self.spent_tokens)
        if self.spec.tokens is not None:
            text += of + tokens(self.spec.tokens)
        if self.prices:
            text += ", " + usd(self.spent_usd)
            if self.spec.usd is not None:
                text += of + usd(self.spec.usd)
        return text

    def report(self) -> dict[str, Any]:
        """summary.json's `spend`: the job's spent, reserved and budget, by model and total."""
        models = sorted(set(self.spent) | set(self.reserved_by_model))
        by_model: dict[str, Any] = {}
        for m in models:
            t = self.spent.get(m, Tokens())
            run = self.this_run(m)
            res = self.reserved_by_model.get(m, [0.0, 0.0])
            priced = self.prices.get(m) is not None
            by_model[m] = {
                "spent": {"tokens": t.total, "prompt": t.prompt, "completion": t.completion,
                          "cached": t.cached, "requests": t.requests,
                          "usd": round(self._cost(m, t), 6) if priced else None},
                "this_run": {"tokens": run.total, "requests": run.requests,
                             "usd": round(self._cost(m, run), 6) if priced else None},
                "reserved": {"tokens": int(res[0]), "usd": round(res[1], 6) if priced else None},
            }
        out: dict[str, Any] = {
            "budget": {"tokens": self.spec.tokens, "usd": self.spec.usd},
            "spent": {"tokens": self.spent_tokens,
                      "usd": round(self.spent_usd, 6) if self.prices else None},
            "reserved": {"tokens": int(self.reserved_tokens),
                         "usd": round(self.reserved_usd, 6) if self.prices else None},
            "by_model": by_model,
            "reached": self.reached,
            "prices": self.prices.as_json(),
            "usd_excludes_models": sorted(self.unpriced),
            "unknown_attempts": self.unknown,
        }
        if self.enforcing:
            out["prompt_estimate_factor"] = round(self.prompt_factor, 3)
        return out

    def final_line(self) -> str | None:
        """One line for the end of a run with a budget or prices; None otherwise."""
        if not (self.enforcing or self.prices):
            return None
        text = "spend: " + self._spent_against(lambda n: f"{n:,.0f} tokens",
                                               money, " of ")
        if self.unpriced:
            text += f" (excludes {', '.join(sorted(self.unpriced))}: no price)"
        if self.unknown:
            text += (f"; {self.unknown} attempt(s) of an earlier run without a budget ended "
                     "with no record of their spend")
        return text + " (the whole job)"


