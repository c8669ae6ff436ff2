"""`tmbatch doctor` and `tmbatch models`: the preflight's checks (`client.preflight`) shown
one a line with where each setting came from, and the served models; nothing billed.

Every check is listed, also those not done (`skip`, with why): a doctor that leaves out what
it could not check reads as all good when it is not.
"""

from __future__ import annotations

import sys

from tmbatch.base.config import ENV_API_KEY, Settings, redact
from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.redact import SECRETS
from tmbatch.client.http import get_json, make_session
from tmbatch.client.preflight import (
    ERROR,
    OK,
    SCAN_LINES,
    SCAN_SECONDS,
    Check,
    format_checks,
    get_settings,
    models_in_input,
    run_checks,
    served_names,
)
from tmbatch.policy import AttemptFailed, error_message


def describe_settings(settings: Settings) -> list[tuple[str, str, str, str]]:
    """(key, label, value, where it came from); the API key is redacted, never printed."""
    src = settings.sources
    rows = [
        ("surface", "surface", settings.surface),
        ("base_url", "base URL", settings.base_url),
        ("api_key", "API key", redact(settings.api_key)),
        ("user_id", "user id", settings.user_id or "(none)"),
        ("timeout", "timeout", f"{settings.timeout:g} s"),
        ("max_retries", "max retries", str(settings.max_retries)),
        ("ca_bundle", "CA bundle", settings.ca_bundle or "(system)"),
    ]
    return [(key, label, value, src.get(key, "default")) for key, label, value in rows]


def _key_check(settings: Settings, sim: bool) -> Check:
    """A missing key is a FAIL even where the server answers without one (the simulator
    does; Tensormesh does not): `tmbatch run` would refuse to start. Not with --sim."""
    if settings.api_key:
        return Check("key", OK, f"inference API key set ({settings.sources.get('api_key')})")
    if sim:
        return Check("key", OK, "no inference API key: none needed with --sim")
    return Check("key", ERROR, f"no inference API key: `tmbatch run` needs one; set "
                 f"{ENV_API_KEY} or pass --api-key-file FILE (or try --sim)", "no_api_key")


async def doctor(
    settings: Settings, input_path: str | None, model: str | None, endpoint: str | None,
    *, as_json: bool = False, sim: bool = False,
) -> int:
    """`tmbatch doctor`: what was resolved from where, then every check; non-zero on a problem.

    Exit 0 all good, 1 warnings only, 3 a problem that would stop `tmbatch run`.
    """
    models, complete = models_in_input(input_path, model=model, endpoint=endpoint)
    report = await run_checks(settings, models)
    report.checks.insert(0, _key_check(settings, sim))
    code = ExitCode.FATAL if report.errors else ExitCode.FAILED if report.warnings else \
        ExitCode.OK
    rows = describe_settings(settings)
    if as_json:
        import orjson

        out = {
            "settings": {key: {"value": value, "source": source}
                         for key, _, value, source in rows},
            "warnings": list(settings.warnings),
            "checks": [c.as_dict() for c in report.checks],
            "served_models": report.served,
            "version": report.version,
            "models_checked": report.models_checked,
            "input_scanned_completely": complete,
            "ok": code == 0,
        }
        sys.stdout.buffer.write(SECRETS.data(orjson.dumps(out)) + b"\n")
        return code
    print("settings (flag > environment > default):")
    for _, label, value, source in rows:
        print(f"  {label:<12} {value:<44} {source}")
    for w in settings.warnings:
        print(f"  note: {w}")
    print("checks:")
    if not models:
        print("  (no model to check: give an INPUT file or --model)")
    elif not complete:
        print(f"  (models of the first {SCAN_LINES} lines / {SCAN_SECONDS:g} s of the input)")
    for line in format_checks(report):
        print(line)
    verdict = {ExitCode.OK: "all good", ExitCode.FAILED: "usable, with warnings",
               ExitCode.FATAL: "problems found"}[code]
    print(f"doctor: {verdict}")
    return code


async def list_models(settings: Settings, *, as_json: bool = False) -> int:
    """`tmbatch models`: the served model names, one a line (or the raw list as JSON)."""
    session = make_session(get_settings(settings), 1)
    try:
        status, body, _ = await get_json(session, "/v1/models")
    except AttemptFailed as exc:
        print(f"tmbatch: models: cannot reach {settings.base_url}: {exc.message}",
              file=sys.stderr)
        return ExitCode.FAILED
    finally:
        await session.close()
    served = served_names(body) if status == 200 else None
    if served is None:
        detail = error_message(body, f"HTTP {status}")
        hint = ""
        if status in (401, 403):
            hint = "; check TENSORMESH_INFERENCE_API_KEY"
        elif status == 404 and settings.surface == "on-demand":
            hint = "; check X-User-Id (--user-id / TENSORMESH_ON_DEMAND_USER_ID)"
        print(f"tmbatch: models: GET /v1/models answered HTTP {status}: {detail}{hint}",
              file=sys.stderr)
        return ExitCode.FATAL if status in (401, 403, 404) else ExitCode.FAILED
    if as_json:
        import orjson

        sys.stdout.buffer.write(orjson.dumps(body) + b"\n")
    else:
        for name in served:
            print(name)
    return ExitCode.OK
