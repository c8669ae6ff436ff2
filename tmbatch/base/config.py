"""Where credentials and endpoints come from: flag > environment > default.

The rules are the Tensormesh SDK's (reference/sdk-configuration.txt), so a user
who knows the SDK knows tmbatch. The "common mistakes" of that document each
get a specific error here, before a single request is sent.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tmbatch.base import defaults

SERVERLESS_DEFAULT = defaults.BASE_URL.value
SERVERLESS_HOST = "serverless.tensormesh.ai"
# On-demand gateways are provider-specific hosts: the reference's example is
# external.nebius.tensormesh.ai (reference/sdk-configuration.txt, raw-api-quickstart.txt).
ON_DEMAND_HOST_RE = re.compile(r"^external\.[a-z0-9-]+\.tensormesh\.ai$", re.IGNORECASE)

ENV_API_KEY = "TENSORMESH_INFERENCE_API_KEY"
ENV_SERVERLESS_URL = "TENSORMESH_SERVERLESS_BASE_URL"
ENV_ON_DEMAND_URL = "TENSORMESH_ON_DEMAND_BASE_URL"
ENV_USER_ID = "TENSORMESH_ON_DEMAND_USER_ID"
ENV_TIMEOUT = "TENSORMESH_TIMEOUT_SECONDS"
ENV_MAX_RETRIES = "TENSORMESH_MAX_RETRIES"
ENV_CA_BUNDLE = "TENSORMESH_CA_BUNDLE"
ENV_CONTROL_PLANE_TOKEN = "TENSORMESH_CONTROL_PLANE_TOKEN"

UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
JWT_RE = re.compile(r"^eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


class ConfigError(Exception):
    """A configuration problem found before anything is sent; the message says the fix."""


def redact(secret: str | None) -> str:
    """Enough of a key to tell two apart, never enough to use one."""
    if not secret:
        return "(none)"
    if len(secret) >= 24:
        return f"…{secret[-4:]} ({len(secret)} chars)"
    return f"*** ({len(secret)} chars)"


@dataclass(frozen=True)
class Settings:
    """Resolved connection settings, with where each value came from."""

    surface: str
    base_url: str
    api_key: str | None = field(repr=False)
    user_id: str | None
    timeout: float
    max_retries: int
    ca_bundle: str | None
    allow_insecure_http: bool = False
    sources: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"Settings(surface={self.surface!r}, base_url={self.base_url!r}, "
            f"api_key={redact(self.api_key)!r}, user_id={self.user_id!r})"
        )

    def headers(self) -> dict[str, str]:
        """Headers every request carries on this surface."""
        out = {"User-Agent": "tmbatch/0.1"}
        if self.api_key:
            out["Authorization"] = f"Bearer {self.api_key}"
        if self.surface == "on-demand" and self.user_id:
            out["X-User-Id"] = self.user_id
        return out


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None  # blank counts as unset, as the SDK does
    return value.strip()


def _pick(
    flag_name: str, flag: str | None, env: Mapping[str, str], env_name: str | None,
    origin: str | None = None,
) -> tuple[str | None, str]:
    """`origin`: where the "flag" value really came from, when not the command line (a job
    file's key: `resolve`'s `origins`)."""
    if flag is not None:
        if not flag.strip():
            raise ConfigError(
                f"{flag_name} was given an empty value; pass a value or leave the flag out"
            )
        return flag.strip(), origin or f"flag {flag_name}"
    if env_name:
        value = _env(env, env_name)
        if value is not None:
            return value, f"env {env_name}"
    return None, "default"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_base_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} {url!r} is not an http(s) URL; expected e.g. https://host")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        raise ConfigError(
            f"{what} {url!r} ends in /v1; give the base URL without it "
            f"({parts.scheme}://{parts.netloc}{path[:-3]}), tmbatch adds the route"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{what} {url!r} has a query or fragment; give only scheme://host[:port]")
    return f"{parts.scheme}://{parts.netloc}{path}"


def read_tm_config(env: Mapping[str, str], path: str | None = None) -> dict[str, str]:
    """The CLI's [managed] values: only ever called when the user asks for it."""
    if path is None:
        root = Path(env.get("TM_CONFIG_HOME") or "~/.config/tensormesh").expanduser()
        cfg = root / "config.toml"
    else:
        cfg = Path(path).expanduser()
    try:
        data = tomllib.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"--tm-config: {cfg} does not exist; run `tm init --sync` first"
        ) from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--tm-config: cannot read {cfg}: {exc}") from None
    managed = data.get("managed")
    if not isinstance(managed, dict):
        raise ConfigError(f"--tm-config: {cfg} has no [managed] table; run `tm init --sync`")
    out: dict[str, str] = {}
    for key, ours in (
        ("gateway_api_key", "api_key"),
        ("gateway_user_id", "user_id"),
        ("gateway_model_id", "model"),
        ("gateway_base", "base_url"),
    ):
        if isinstance(managed.get(key), str) and managed[key].strip():
            out[ours] = managed[key].strip()
    out["_path"] = str(cfg)
    return out


def read_key_file(path: str) -> str:
    """A key from a file keeps it out of `ps` and shell history."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--api-key-file {path}: not a text file") from None
    if not text or "\n" in text:
        raise ConfigError(f"--api-key-file {path}: expected exactly one non-empty line (the key)")
    return text


def resolve(
    flags: Mapping[str, str | None],
    env: Mapping[str, str] | None = None,
    *,
    require_key: bool = True,
    origins: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve settings. `flags` holds None for flags that were not given.

    Keys: surface, base_url, api_key, api_key_file, user_id, timeout,
    max_retries, ca_bundle, tm_config (path or "" for the default location),
    allow_insecure_http ("1" when set). `origins`: for a key whose value in `flags` did not
    come from the command line, the source to report instead of "flag --KEY" (a job file
    sits between flag and environment: `cli.resolve`).
    """
    env = os.environ if env is None else env
    origins = origins or {}
    sources: dict[str, str] = {}
    warnings: list[str] = []
    tm = read_tm_config(env, flags.get("tm_config") or None) \
        if flags.get("tm_config") is not None else None
    surface = _surface(flags, sources, origins.get("surface"))
    api_key = _api_key(flags, env, tm, sources)
    user_id, sources["user_id"] = _from_tm(
        _pick("--user-id", flags.get("user_id"), env, ENV_USER_ID), tm, "user_id")
    env_url = ENV_SERVERLESS_URL if surface == "serverless" else ENV_ON_DEMAND_URL
    picked = _pick("--base-url", flags.get("base_url"), env, env_url, origins.get("base_url"))
    if surface == "on-demand":
        picked = _from_tm(picked, tm, "base_url")
    base_url, sources["base_url"] = picked
    if surface == "serverless":
        base_url = _serverless_url(base_url, env)
        if user_id and flags.get("user_id") is not None:
            warnings.append(
                "--user-id is ignored on the serverless surface (X-User-Id is on-demand only)"
            )
    else:
        base_url = _on_demand_url(base_url, env)
        _check_user_id(user_id)
    base_url = _check_base_url(base_url, "base URL")
    _check_key(api_key, env, require_key)
    insecure_ok = bool(flags.get("allow_insecure_http"))
    _check_transport(base_url, api_key, insecure_ok)
    return Settings(
        surface=surface,
        base_url=base_url,
        api_key=api_key,
        user_id=user_id if surface == "on-demand" else None,
        timeout=_timeout(flags, env, sources, origins.get("timeout")),
        max_retries=_max_retries(flags, env, sources, origins.get("max_retries")),
        ca_bundle=_ca_bundle(flags, env, sources, origins.get("ca_bundle")),
        allow_insecure_http=insecure_ok,
        sources=sources,
        warnings=tuple(warnings),
    )


def _from_tm(picked: tuple[str | None, str], tm: dict[str, str] | None,
             key: str) -> tuple[str | None, str]:
    """The tm CLI's value, only when neither flag nor environment gave one (and only when the
    user asked for that file with --tm-config)."""
    if picked[0] is None and tm and key in tm:
        return tm[key], f"tm config {tm['_path']}"
    return picked


def _surface(flags: Mapping[str, str | None], sources: dict[str, str],
             origin: str | None) -> str:
    surface = (flags.get("surface") or defaults.SURFACE.value).strip()
    if surface not in ("serverless", "on-demand"):
        raise ConfigError(f"--surface {surface!r}: expected serverless or on-demand")
    sources["surface"] = (origin or "flag --surface") if flags.get("surface") else "default"
    return surface


def _api_key(flags: Mapping[str, str | None], env: Mapping[str, str],
             tm: dict[str, str] | None, sources: dict[str, str]) -> str | None:
    """Flag, key file, environment, then (only when asked) the tm CLI's config."""
    if flags.get("api_key") is not None and flags.get("api_key_file") is not None:
        raise ConfigError("give either --api-key or --api-key-file, not both")
    key_file = flags.get("api_key_file")
    if key_file is not None:
        if not key_file.strip():
            raise ConfigError("--api-key-file was given an empty value; pass a path")
        sources["api_key"] = "flag --api-key-file"
        return read_key_file(key_file)
    api_key, sources["api_key"] = _from_tm(
        _pick("--api-key", flags.get("api_key"), env, ENV_API_KEY), tm, "api_key")
    return api_key


def _serverless_url(base_url: str | None, env: Mapping[str, str]) -> str:
    base_url = base_url or SERVERLESS_DEFAULT
    on_demand_env = _env(env, ENV_ON_DEMAND_URL)
    if on_demand_env and base_url.rstrip("/") == on_demand_env.rstrip("/"):
        raise ConfigError(
            f"the serverless base URL is the same as {ENV_ON_DEMAND_URL} ({base_url}): "
            "serverless and on-demand base URLs are mixed up; pass --surface on-demand "
            "to use the on-demand gateway"
        )
    host = urlsplit(base_url).hostname or ""
    if ON_DEMAND_HOST_RE.match(host):
        raise ConfigError(
            f"the serverless base URL {base_url} is an on-demand gateway host "
            f"(external.<provider>.tensormesh.ai): serverless and on-demand base URLs are "
            f"mixed up; pass --surface on-demand --user-id UUID to use it (or leave "
            f"--base-url out for {SERVERLESS_DEFAULT})"
        )
    return base_url


def _on_demand_url(base_url: str | None, env: Mapping[str, str]) -> str:
    if base_url is None:
        hint = ""
        if _env(env, ENV_SERVERLESS_URL):
            hint = f" ({ENV_SERVERLESS_URL} is set, but that is the serverless host)"
        raise ConfigError(
            "on-demand needs a base URL: pass --base-url or set "
            f"{ENV_ON_DEMAND_URL} to your provider-specific gateway host{hint}"
        )
    if urlsplit(base_url).hostname == SERVERLESS_HOST:
        raise ConfigError(
            f"on-demand base URL {base_url} is the serverless host: serverless and "
            "on-demand base URLs are mixed up; use --surface serverless, or your "
            "provider-specific on-demand gateway host"
        )
    return base_url


def _check_user_id(user_id: str | None) -> None:
    if user_id is None:
        raise ConfigError(
            "on-demand needs both a base URL and a user id: pass --user-id or set "
            f"{ENV_USER_ID} (the UUID sent as X-User-Id)"
        )
    if not UUID_RE.match(user_id):
        raise ConfigError(
            f"user id {user_id!r} is not a UUID; on-demand sends it as X-User-Id and "
            "expects your Tensormesh user UUID"
        )


def _check_key(api_key: str | None, env: Mapping[str, str], require_key: bool) -> None:
    if api_key is not None:
        if JWT_RE.match(api_key):
            raise ConfigError(
                "the API key looks like a Control Plane bearer token (a JWT); inference needs "
                f"an inference API key: set {ENV_API_KEY} (see `tm users api-keys create`)"
            )
        if any(c.isspace() for c in api_key) or not api_key.isprintable():
            raise ConfigError("the API key contains spaces or control characters; check its source")
        return
    if not require_key:
        return
    hint = ""
    if _env(env, ENV_CONTROL_PLANE_TOKEN):
        hint = (
            f" ({ENV_CONTROL_PLANE_TOKEN} is set, but a Control Plane token cannot be "
            "used for inference)"
        )
    raise ConfigError(
        f"no inference API key: set {ENV_API_KEY}, or pass --api-key-file FILE; "
        f"to try tmbatch without credentials, add --sim{hint}"
    )


def _check_transport(base_url: str, api_key: str | None, insecure_ok: bool) -> None:
    host = urlsplit(base_url).hostname or ""
    if base_url.startswith("http://") and api_key and not is_loopback(host) and not insecure_ok:
        raise ConfigError(
            f"refusing to send the API key over plain http:// to {host}; use https, or pass "
            "--allow-insecure-http if this network is trusted"
        )


def _timeout(flags: Mapping[str, str | None], env: Mapping[str, str],
             sources: dict[str, str], origin: str | None) -> float:
    raw, sources["timeout"] = _pick("--timeout", flags.get("timeout"), env, ENV_TIMEOUT, origin)
    if raw is None:
        return defaults.TIMEOUT.value
    try:
        timeout = float(raw)
    except ValueError:
        timeout = -1.0
    if not (0 < timeout < 1e6):
        raise ConfigError(f"timeout {raw!r} ({sources['timeout']}): expected seconds > 0")
    return timeout


def _max_retries(flags: Mapping[str, str | None], env: Mapping[str, str],
                 sources: dict[str, str], origin: str | None) -> int:
    raw, sources["max_retries"] = _pick(
        "--max-retries", flags.get("max_retries"), env, ENV_MAX_RETRIES, origin
    )
    if raw is None:
        return defaults.MAX_RETRIES.value
    if not raw.isdigit() or int(raw) > 1000:
        raise ConfigError(
            f"max retries {raw!r} ({sources['max_retries']}): expected an integer 0-1000"
        )
    return int(raw)


def _ca_bundle(flags: Mapping[str, str | None], env: Mapping[str, str],
               sources: dict[str, str], origin: str | None) -> str | None:
    ca_bundle, sources["ca_bundle"] = _pick(
        "--ca-bundle", flags.get("ca_bundle"), env, ENV_CA_BUNDLE, origin
    )
    if ca_bundle is None:
        return None
    if not Path(ca_bundle).is_file():
        raise ConfigError(f"CA bundle {ca_bundle} ({sources['ca_bundle']}) is not a readable file")
    try:
        ssl.create_default_context(cafile=ca_bundle)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"CA bundle {ca_bundle} ({sources['ca_bundle']}) is not a PEM file of CA "
            f"certificates ({exc}); give the PEM (-----BEGIN CERTIFICATE-----) of the CA "
            "that signed the server's certificate") from None
    return ca_bundle


def check_model(model: str, where: str) -> str | None:
    """A Control Plane modelId UUID is the most common wrong model; say so."""
    if UUID_RE.match(model.strip()):
        return (
            f"{where}: model {model!r} is a UUID (a Control Plane modelId); send the served "
            "model name instead (serverless model name, or the served gateway model name "
            "stored under gateway_model_id)"
        )
    return None
