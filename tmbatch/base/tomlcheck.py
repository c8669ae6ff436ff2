"""Typed reads of a TOML table, with errors that name the file, the key and what it must be.

Job files and their `[label]` table are written by people and read by machines that cannot
ask back (cron, a pod), so every wrong value is one clear error before anything runs.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.config import ConfigError


def _show(value: Any) -> str:
    """A value as the user would recognise it from the file, cut short."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


class TableChecker:
    """Typed reads of one table with error messages that name the file and the key."""

    def __init__(self, path: Path, prefix: str = "") -> None:
        self.path = path
        self.prefix = prefix

    def fail(self, key: str, what: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.path}: key `{self.prefix}{key}` must be {what}, "
                           f"got {_show(value)}")

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "a non-empty string", value)
        return value

    def path_value(self, key: str, value: Any) -> str:
        text = self.string(key, value)
        if "://" in text:  # a URL (s3://bkt/out/): not relative to the job file
            return text
        p = Path(text).expanduser()
        # normpath, not resolve(): a ConfigMap mount is a symlink farm, keep the mounted path
        return os.path.normpath(p if p.is_absolute() else self.path.parent / p)

    def pos_int(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, "a positive integer", value)
        return value

    def nonneg_int(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(key, "an integer of 0 or more", value)
        return value

    def pos_number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self.fail(key, "a number greater than 0", value)
        return float(value)

    def nonneg_number(self, key: str, value: Any) -> float:
        if (isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0
                or value == float("inf")):
            raise self.fail(key, "a number of 0 or more", value)
        return float(value)

    def number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, "a number", value)
        return float(value)

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def choice(self, key: str, value: Any, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(key, "one of " + ", ".join(f'"{c}"' for c in choices), value)
        return str(value)

    def string_list(self, key: str, value: Any) -> list[str]:
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise self.fail(key, "a non-empty list of non-empty strings", value)
        return [v.strip() for v in value]

    def table(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "a table", value)
        return value


def unknown_key(path: Path, key: str, known: list[str], prefix: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean `{prefix}{close[0]}`?" if close else ""
    return ConfigError(f"{path}: unknown key `{prefix}{key}`{hint} (known keys: "
                       + ", ".join(prefix + k for k in sorted(known)) + ")")
