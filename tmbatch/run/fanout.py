"""`--models A,B,C` and `--samples N`: one input, a standard output directory per model.

Each model's directory is an ordinary job (`inputs.samples` stages its units into its own
`units.jsonl`), run by an ordinary `Runner`, so everything a run promises holds in it as it is:
resume, never-re-send, status, merge, export, resend. What this module adds is what the
directories share, decided once here:

* everything local first: every model's units staged and checked (bad input lines, an input
  that changed under a journal) before preflight or the first request;
* one preflight for all the models: a model the server does not serve is not a reason to stop
  the others; its units fail `permanent` (`model_not_served`) unsent, in its own directory;
* one budget: the models run one after another, each at the full --concurrency, and each is
  given what is left of --budget-tokens/--budget-usd after what every other directory has
  spent (from their journals, so a resume counts earlier runs too);
* one exit code, the worst: a run that stops (signal, budget, fatal, I/O) ends the fan-out
  with its code, and the next run of the same command resumes where it stopped; otherwise
  1 if any directory has failed lines, else 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmbatch.base.config import ConfigError, Settings
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.files import JOURNAL, make_dir
from tmbatch.base.logs import say
from tmbatch.base.stop import Stop
from tmbatch.inputs.files import url_scheme
from tmbatch.inputs.samples import (
    UNITS,
    dir_name,
    read_manifest,
    stage_units,
    write_manifest,
)
from tmbatch.inputs.templates import REQUESTS
from tmbatch.journal import journal
from tmbatch.run.config import Learnt, RunConfig
from tmbatch.run.outdir import Lock, lock_output
from tmbatch.run.runner import SIGNALS, Runner
from tmbatch.spend.budget import BudgetSpec
from tmbatch.spend.usage import Tokens, money

log = logging.getLogger("tmbatch")
GO_ON = (ExitCode.OK, ExitCode.FAILED)  # a model's run that ended like this: the next one runs


@dataclass(frozen=True)
class Part:
    """One model's share of the job: its directory's run."""

    model: str | None  # None: --samples alone, each line's own model
    config: RunConfig


class FanOut:
    """The models of one `tmbatch run --models ... --samples N`, in the order given."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.parts = [self._part(m) for m in (config.models or (None,))]
        self.stop = Stop()  # a signal while no model's run holds the handlers
        self.lock: Lock | None = None  # -o itself, held from staging to the last model's end
        self._waiting: asyncio.Task[Any] | None = None  # preflight: cancelled by a signal

    def _part(self, model: str | None) -> Part:
        c = self.config
        out = c.out_dir if model is None else c.out_dir / dir_name(model)
        job_id = c.job_id
        if job_id is not None and model is not None:  # Idempotency-Keys: one job per model
            job_id = f"{job_id}-{dir_name(model)}"
        if c.records is not None:  # a labelling job: each model renders its own requests
            return Part(model, dataclasses.replace(
                c, input=str(out / REQUESTS), out_dir=out, model=model or c.model, models=(),
                job_id=job_id))
        return Part(model, dataclasses.replace(
            c, input=str(out / UNITS), out_dir=out, model=model or c.model, endpoint=None,
            models=(), job_id=job_id, table=None, records=None))

    # -- the local half -------------------------------------------------------------------
    def stage(self) -> None:
        """Every model's units written and checked, and the manifest: nothing is sent yet."""
        c = self.config
        if c.models and (c.out_dir / JOURNAL).exists():
            raise ConfigError(f"{c.out_dir} holds a run of one model; --models writes a "
                              "directory per model under -o: give another --output")
        # a second fan-out on a live -o stops here, before it writes or sends anything (with
        # --samples alone -o is the run's own directory, which its runner locks)
        if c.models and c.out_dir.is_dir():
            self.lock = lock_output(c.out_dir)
        for part in self.parts if c.records is None else ():  # (labelling: `labels.setup`)
            stage_units(c.input, part.config.out_dir, part.model, c.samples,
                        default_model=c.model, endpoint=c.endpoint, stream=c.stream,
                        restart=c.restart, max_line_bytes=c.max_line_bytes)
        if c.models and self.lock is None:  # a new -o, once its input proved good
            make_dir(c.out_dir)
            self.lock = lock_output(c.out_dir)
        source = c.records if c.records is not None else c.input
        write_manifest(c.out_dir, source if url_scheme(source) else os.path.abspath(source),
                       c.samples, [(p.model, p.config.out_dir.name) for p in self.parts
                                   if p.model is not None], c.request_shape())

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- the network half -----------------------------------------------------------------
    async def send(self, settings: Settings) -> int:
        """Preflight once, then each model's run in turn; the worst exit code. A signal
        before a model's run has begun (preflight, between two models) ends the fan-out
        there; during a run, that run's drain handles it (`Runner`)."""
        self._guard()
        try:
            served, stop = await self._preflight(settings)
            if stop is not None:
                return stop
            return await self._run_models(Learnt(settings, served))
        finally:
            self._unguard()

    async def _preflight(self, settings: Settings) -> tuple[tuple[str, ...] | None, int | None]:
        """(the models served, None), or (None, the exit code) when the fan-out must not go
        on: no model served, the key refused, a signal."""
        c = self.config
        if not c.preflight:
            return None, None
        from tmbatch.client.preflight import preflight_for_run

        self._waiting = asyncio.get_running_loop().create_task(
            preflight_for_run(settings, c.input, c.model, c.endpoint, models=c.models))
        try:
            verdict = await self._waiting
        except asyncio.CancelledError:
            if not self.stop.stopping:
                raise
            return None, self._interrupted()
        finally:
            self._waiting = None
        return verdict.served, verdict.stop

    async def _run_models(self, learnt: Learnt) -> int:
        codes: list[int] = []  # of the models' runs, in order
        stop: int | None = None  # why the models after them were not started
        for i, part in enumerate(self.parts):
            if self.stop.stopping:
                stop = self._interrupted()
                break
            budget = self._share(part)
            if budget is None:
                say("budget", "budget reached across the models: "
                    f"{', '.join(str(p.model) for p in self.parts[i:])} not started; run "
                    "again with a larger budget to continue", level=logging.WARNING)
                stop = ExitCode.BUDGET
                break
            if part.model is not None and not self.config.quiet:
                say("model", f"model {i + 1}/{len(self.parts)}: {part.model} -> "
                    f"{part.config.out_dir}", model=part.model, output=str(part.config.out_dir))
            code = await _run_one(dataclasses.replace(part.config, budget=budget), learnt)
            self._guard()  # the run's own handlers are gone: a signal now ends the fan-out
            codes.append(code)
            if code not in GO_ON:
                break
        self._say_end(codes)
        return worst(codes if stop is None else [*codes, stop])

    def _guard(self) -> None:
        """Signals outside a model's run: stop before the next one (and end preflight)."""
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _unguard(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    def _on_signal(self, signum: int) -> None:
        self.stop.on_signal(signum)
        if self._waiting is not None:
            self._waiting.cancel()

    def _interrupted(self) -> int:
        """Stopped by a signal with no model's run going: what was done stays done."""
        reason = self.stop.reason
        assert reason is not None
        msg = (f"interrupted ({reason.name}) before the next model's run began; run the same "
               "command to go on (finished models send nothing again)")
        say("interrupted", msg, text=f"tmbatch: {msg}", level=logging.WARNING,
            signal=reason.name, exit_code=reason.exit_code)
        return reason.exit_code

    def _share(self, part: Part) -> BudgetSpec | None:
        """What is left of the job's budget for `part`: the limits less what every other
        directory has spent (its own earlier spend its run counts itself); None: nothing."""
        spec = self.config.budget
        if not spec.limited:
            return spec
        tokens, usd = 0, 0.0
        for other in self.parts:
            if other is not part:
                t, u = spent_in(other.config.out_dir, spec)
                tokens, usd = tokens + t, usd + u
        left_tokens = None if spec.tokens is None else spec.tokens - tokens
        left_usd = None if spec.usd is None else spec.usd - usd
        if (left_tokens is not None and left_tokens <= 0) or \
                (left_usd is not None and left_usd <= 0):
            return None
        return BudgetSpec(left_tokens, left_usd, spec.prices)

    def _say_end(self, codes: list[int]) -> None:
        if self.config.quiet or not self.config.models:
            return
        spec = self.config.budget
        if spec.limited or spec.prices:  # each directory's line counts only its own
            spent = [spent_in(p.config.out_dir, spec) for p in self.parts]
            text = f"spend across the models: {sum(t for t, _ in spent):,} tokens"
            text += f" of {spec.tokens:,}" if spec.tokens is not None else ""
            if spec.prices:
                text += f", {money(sum(u for _, u in spent))}"
                text += f" of {money(spec.usd)}" if spec.usd is not None else ""
            say("spend", text, tokens=sum(t for t, _ in spent),
                usd=round(sum(u for _, u in spent), 6), budget_tokens=spec.tokens,
                budget_usd=spec.usd)
        ran = {str(p.model): code for p, code in zip(self.parts, codes, strict=False)}
        done = ", ".join(f"{m} exit {code}" for m, code in ran.items())
        left = [str(p.model) for p in self.parts[len(codes):]]
        text = f"models: {done}" + (f"; not run: {', '.join(left)}" if left else "")
        say("models", text, exit_codes=ran, not_run=left)


async def _run_one(config: RunConfig, learnt: Learnt) -> int:
    """One model's directory, as `tmbatch run` runs one: local half, then the sending."""
    runner = Runner(config)
    runner.install_signals()
    try:
        runner.prepare()
        return await runner.send(learnt)
    finally:
        await runner.close()


def spent_in(out_dir: Path, spec: BudgetSpec) -> tuple[int, float]:
    """Tokens and dollars (at `spec`'s prices) a directory's journal says it has spent."""
    if not (out_dir / JOURNAL).exists():
        return 0, 0.0
    state = journal.load(out_dir, repair=False)
    tokens, usd = 0, 0.0
    for model, row in (state.spend or {}).items():
        t = Tokens.of(row)
        tokens += t.total
        price = spec.prices.get(model)
        if price is not None:
            usd += price.cost(t.prompt, t.completion, t.cached)
    return tokens, usd


def check_not_models(config: RunConfig) -> None:
    """A run without --models on the -o of a --models run would start a job beside them."""
    manifest = read_manifest(config.out_dir)
    if not config.models and manifest is not None and manifest["models"]:
        raise ConfigError(f"{config.out_dir} holds a --models run (a directory per model"
                          f"{models_hint(config.out_dir, ': ')}); resume it with the same "
                          "--models, or give another --output")


def model_dirs(out: Path) -> dict[str, Path]:
    """The model directories the manifest of a --models run's -o names, by model, in order."""
    manifest = read_manifest(out)
    return {m["model"]: out / m["dir"] for m in (manifest or {}).get("models", [])
            if isinstance(m, dict) and isinstance(m.get("dir"), str)
            and isinstance(m.get("model"), str)}


def models_hint(out: Path, lead: str = "; it holds one per model (--models): ") -> str:
    """For a command given the -o of a --models run: the directories to give it instead."""
    dirs = [str(d) for d in model_dirs(out).values()]
    return lead + ", ".join(dirs) if dirs else ""


def worst(codes: list[int]) -> int:
    """One exit code for the models: a stop's own code, else 1 when any had failed lines."""
    for code in codes:
        if code not in GO_ON:
            return code
    return max(codes, default=ExitCode.OK)
