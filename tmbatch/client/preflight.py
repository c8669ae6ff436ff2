"""Preflight: catch a wrong key, host or model before a single completion is billed.

Checks, in order: GET /health and /version (reachability), GET /v1/models and
whether every model the input names is served, then one cheap idempotent
authenticated call (POST /tokenize) that a wrong key fails. Every route gets the
key: the public serverless host also answers the GETs without one, but a server
that wants it there (LiteLLM, vLLM with --api-key) answers 401, and blaming the
key for a 401 it never saw would send the user hunting for the wrong problem.
`tmbatch run` runs them before its first request (`--no-preflight` skips them);
`tmbatch doctor` (`client.doctor`) runs them alone and shows where each setting came from.

"Every model the input names" means the models of a bounded prefix of the
input (SCAN_LINES lines or SCAN_SECONDS, whichever ends first) plus --model:
reading a million-line file before the first request would delay every run.
A model that is not served stops the run only when no scanned model is served;
otherwise its lines fail `permanent` (model_not_served) and the rest runs. The
run gets the served list, so a line past the scan naming an unserved model
fails the same way (retry.LineSender), without being sent.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from tmbatch.base.config import UUID_RE, Settings, check_model, redact
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.logs import public_url, say
from tmbatch.base.redact import SECRETS
from tmbatch.client.http import get_json, make_session, send
from tmbatch.inputs.files import InputError, open_input
from tmbatch.inputs.reader import BadLine, read_requests
from tmbatch.policy import AttemptFailed, error_message

log = logging.getLogger("tmbatch")

SCAN_LINES = 10_000
SCAN_SECONDS = 2.0
PREFLIGHT_TIMEOUT = 30.0
# The key check must not hold a run back for long: a slow /tokenize is a warning, not a stop.
AUTH_TIMEOUT = 10.0

OK, WARNING, ERROR, SKIPPED = "ok", "warning", "error", "skipped"
# The checks after GET /health, in order: each is listed, skipped with why, when /health
# found nothing to check them against.
LATER_CHECKS = ("version", "models", "auth")


@dataclass
class Check:
    """One check's outcome; `code` is stable for scripts, `detail` is for people."""

    name: str
    status: str  # ok, warning, error, skipped (detail: why)
    detail: str
    code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    served: list[str] | None = None
    version: str | None = None
    models_checked: list[str] = field(default_factory=list)
    scan_complete: bool = True

    def add(self, name: str, status: str, detail: str, code: str | None = None) -> Check:
        c = Check(name, status, SECRETS.text(detail), code)  # a server may echo the key
        self.checks.append(c)
        return c

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if c.status == ERROR]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == WARNING]

    @property
    def skipped(self) -> list[Check]:
        return [c for c in self.checks if c.status == SKIPPED]

    def skip_rest(self, why: str) -> None:
        """Every check after /health, listed as not done and why: never silently absent."""
        for name in LATER_CHECKS:
            self.add(name, SKIPPED, f"not checked: {why}")


def models_in_input(
    path: str | None,
    *,
    model: str | None = None,
    endpoint: str | None = None,
    max_lines: int = SCAN_LINES,
    max_seconds: float = SCAN_SECONDS,
) -> tuple[list[str], bool]:
    """Models named by the first lines of `path` plus --model; (models, whole file read).

    stdin, FIFOs and devices are never scanned (they cannot be read twice). Bad lines are skipped:
    the run reports them itself, naming the line.
    """
    found: dict[str, None] = {}
    if model:
        found[model] = None
    if not path or path == "-":
        return list(found), path is None
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return list(found), False  # the run itself reports the missing file clearly
    if not regular:
        return list(found), False  # a FIFO or device cannot be read twice
    try:
        f = open_input(path)
    except InputError:
        return list(found), False
    deadline = time.monotonic() + max_seconds
    complete = True
    with f:
        for n, item in enumerate(read_requests(f, endpoint=endpoint, model=model), 1):
            if not isinstance(item, BadLine):
                m = item.body.get("model")
                if isinstance(m, str) and m not in found:
                    found[m] = None
            if n >= max_lines or (n % 256 == 0 and time.monotonic() > deadline):
                complete = f.read(1) == b""
                break
    return list(found), complete


def unknown_model_message(name: str, served: list[str]) -> str:
    """Say what is wrong and what would be right: a UUID, a near miss, or the served list."""
    hint = check_model(name, "model")
    if hint:
        return hint
    close = difflib.get_close_matches(name, served, n=3, cutoff=0.6)
    if not close:
        lowered = {s.lower(): s for s in served}
        if name.lower() in lowered:
            close = [lowered[name.lower()]]
    listed = ", ".join(served[:10]) + (" ..." if len(served) > 10 else "")
    if close:
        return (f"model {name!r} is not served here; did you mean {close[0]!r}? "
                f"(served: {listed}; `tmbatch models` lists them)")
    return (f"model {name!r} is not served here (served: {listed or 'none'}; "
            "`tmbatch models` lists them)")


def served_names(body: Any) -> list[str] | None:
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    return [m["id"] for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]


def get_settings(settings: Settings) -> Settings:
    """The run's settings, key included (see the module docstring), with a shorter timeout:
    a diagnostic GET that takes minutes is itself the answer."""
    return dataclasses.replace(settings, timeout=min(settings.timeout, PREFLIGHT_TIMEOUT))


async def run_checks(
    settings: Settings, models: list[str], *, check_auth: bool = True
) -> Report:
    """Every check against `settings.base_url`; never raises for a server's answer."""
    report = Report(models_checked=list(models))
    gets = make_session(get_settings(settings), 2)
    try:
        if not await _reachability(gets, settings, report):
            return report
        await _models(gets, settings, models, report)
    finally:
        await gets.close()
    if check_auth:
        await _auth(settings, models, report)
    else:
        report.add("auth", SKIPPED, "not checked: not asked for")
    return report


async def _reachability(session: Any, settings: Settings, report: Report) -> bool:
    try:
        status, body, _ = await get_json(session, "/health")
    except AttemptFailed as exc:
        url = public_url(settings.base_url)
        if exc.cls.policy.reached_server:  # connected, then no answer: the host is there
            report.add("health", WARNING, f"no answer from {url}: {exc.message}",
                       "no_answer")
            report.skip_rest("GET /health got no answer")
            return False
        # DNS, a refused connection, TLS: every request would fail the same way, so the run
        # must not start (and `doctor` must not call it usable)
        hint = "" if exc.code == "tls_certificate" else \
            "; check --base-url (or TENSORMESH_*_BASE_URL) and the network"
        report.add("health", ERROR, f"cannot connect to {url}: {exc.message}{hint}",
                   "unreachable")
        report.skip_rest("the host could not be reached")
        return False
    if status == 200:
        report.add("health", OK, "GET /health 200")
    else:
        report.add("health", WARNING, f"GET /health answered HTTP {status}: "
                   f"{error_message(body, '')}".rstrip(": "), f"health_{status}")
    try:
        status, body, _ = await get_json(session, "/version")
    except AttemptFailed as exc:
        report.add("version", WARNING, f"GET /version failed: {exc.message}", exc.code)
        return True
    if status == 200:
        version = body.get("version") if isinstance(body, dict) else None
        report.version = SECRETS.text(str(version if version is not None else body))[:200]
        report.add("version", OK, report.version)
    else:
        report.add("version", WARNING, f"GET /version answered HTTP {status}", f"version_{status}")
    return True


async def _models(session: Any, settings: Settings, models: list[str], report: Report) -> None:
    try:
        status, body, _ = await get_json(session, "/v1/models")
    except AttemptFailed as exc:
        report.add("models", WARNING, f"GET /v1/models failed: {exc.message}; models not "
                   "checked", exc.code)
        return
    if status in (401, 403):
        report.add("models", ERROR, f"GET /v1/models refused the key (HTTP {status}: "
                   f"{error_message(body, 'unauthorized')}); check "
                   f"TENSORMESH_INFERENCE_API_KEY ({settings.sources.get('api_key', '?')})",
                   "unauthorized")
        return
    if status == 404 and settings.surface == "on-demand":
        report.add("models", ERROR, f"GET /v1/models answered 404 ({error_message(body, '')}): "
                   "the gateway has no route for this user; check X-User-Id (--user-id / "
                   "TENSORMESH_ON_DEMAND_USER_ID) and the on-demand base URL", "no_route")
        return
    served = served_names(body) if status == 200 else None
    if served is None:
        report.add("models", WARNING, f"GET /v1/models answered HTTP {status} without a model "
                   "list; models not checked", f"models_{status}")
        return
    report.served = served
    report.add("models", OK, f"{len(served)} served: {', '.join(served[:10])}"
               + (" ..." if len(served) > 10 else ""))
    # One unserved model fails only its own lines (vLLM writes an error line for that request
    # alone); only when nothing the input names is served is the whole run doomed.
    doomed = not any(name in served for name in models)
    for name in models:
        if name in served:
            report.add("model", OK, f"{name!r} is served")
        else:
            code = "model_is_uuid" if UUID_RE.match(name) else "unknown_model"
            detail = unknown_model_message(name, served)
            if not doomed:
                detail += ("; its lines fail `permanent` (model_not_served) without being "
                           "sent, the rest runs")
            report.add("model", ERROR if doomed else WARNING, detail, code)


def _probe_model(models: list[str], served: list[str] | None) -> str | None:
    for m in models:
        if served is None or m in served:
            return m
    if served:
        return served[0]
    return models[0] if models else None


async def _auth(settings: Settings, models: list[str], report: Report) -> None:
    model = _probe_model(models, report.served)
    body: dict[str, Any] = {"prompt": "tmbatch preflight"}
    if model:
        body["model"] = model
    session = make_session(dataclasses.replace(
        settings, timeout=min(settings.timeout, AUTH_TIMEOUT)), 1)
    key = f"key {redact(settings.api_key)} ({settings.sources.get('api_key', '?')})"
    if not settings.api_key:
        key = "request without a key"
    try:
        await send(session, "/tokenize", body)
    except AttemptFailed as exc:
        if exc.cls.policy.stops_run and not settings.api_key:
            report.add("auth", ERROR, f"no inference API key, and the server requires one "
                       f"(HTTP {exc.status}): set TENSORMESH_INFERENCE_API_KEY or pass "
                       "--api-key-file FILE", "no_api_key")
        elif exc.cls.policy.stops_run:
            report.add("auth", ERROR, f"POST /tokenize refused the {key}: HTTP {exc.status} "
                       f"{exc.message.rstrip('.')}. Use an inference API key (not a Control "
                       "Plane token)"
                       + (" and check the user id" if settings.surface == "on-demand" else ""),
                       exc.code)
        else:
            said = f"HTTP {exc.status}" if exc.status else exc.code
            if exc.message != said:
                said += f": {exc.message}"
            report.add("auth", WARNING, f"could not verify the {key}: POST /tokenize {said}",
                       exc.code)
        return
    finally:
        await session.close()
    report.add("auth", OK, f"POST /tokenize accepted the {key}")


def format_checks(report: Report) -> list[str]:
    mark = {OK: "ok  ", WARNING: "WARN", ERROR: "FAIL", SKIPPED: "skip"}
    return [f"  {mark[c.status]}  {c.name:<8} {c.detail}" for c in report.checks]


@dataclass(frozen=True)
class Verdict:
    """What preflight tells the run: stop (an exit code), or go with the served models."""

    stop: int | None
    served: tuple[str, ...] | None = None  # GET /v1/models' list; None: not checked


async def preflight_for_run(
    settings: Settings, input_path: str, model: str | None, endpoint: str | None,
    models: tuple[str, ...] = (),
) -> Verdict:
    """Run the checks before `tmbatch run`; an exit code when the run must not start.

    Only what would fail every request stops the run (exit 3: a host that cannot be
    reached, the key refused, no model of the input served, no route), in one message. An
    unserved model among served ones is a warning: its lines fail one by one. A missing
    /health is a warning; the last line says what went ahead unchecked, never "ok" then.
    `models`: --models, checked instead of the input's.
    """
    if models:  # --models: every line goes to each of these, whatever it names
        checked, complete = list(models), True
    else:
        checked, complete = models_in_input(input_path, model=model, endpoint=endpoint)
    report = await run_checks(settings, checked)
    for c in report.warnings:
        log.warning("preflight: %s: %s", c.name, c.detail)
    if report.errors:
        why = "; ".join(f"{c.name}: {c.detail}" for c in report.errors)
        msg = (f"preflight failed, nothing was sent (--no-preflight skips these checks): "
               f"{why}")
        say("stopped", msg, text=f"tmbatch: {msg}", level=logging.ERROR, reason="preflight",
            exit_code=ExitCode.FATAL, checks=[c.as_dict() for c in report.errors])
        return Verdict(ExitCode.FATAL)
    url, verdict = public_url(settings.base_url), _models_verdict(report, complete)
    if report.warnings or report.skipped:
        unchecked = ", ".join(c.name for c in report.skipped)
        log.info("preflight: going ahead with %d warning(s)%s: %s; %s",
                 len(report.warnings), f" ({unchecked} not checked)" if unchecked else "",
                 url, verdict)
    else:
        log.info("preflight ok: %s; %s", url, verdict)
    return Verdict(None, None if report.served is None else tuple(report.served))


def _models_verdict(report: Report, complete: bool) -> str:
    """What the model checks established, in the words the final preflight line uses."""
    if report.served is None:
        return "models not checked (no model list)"
    if not report.models_checked:
        return "no model to check"
    unserved = [m for m in report.models_checked if m not in report.served]
    scanned = "" if complete else f" (models of the first {SCAN_LINES} lines)"
    text = f"{len(report.models_checked)} model(s) checked{scanned}"
    if unserved:
        text += f", {len(unserved)} not served: their lines fail, the rest runs"
    return text
