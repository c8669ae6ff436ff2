"""The API key never reaches a log, an output file, a message or a report.

A server (or a proxy in front of it) may echo request headers back in an error or even in an
answer; a 401's message may quote the key it refused. Everything tmbatch writes for a person
or to disk passes through here, so one registry of secrets covers logs (`logs`), output files
(`files`, `writer`) and printed reports (`doctor`). An answer that echoed the key is kept,
with the key replaced, never dropped: it was paid for.
"""

from __future__ import annotations

import orjson

REDACTED = "[redacted]"
MIN_LENGTH = 8
_REDACTED_BYTES = REDACTED.encode()


class Secrets:
    """The secrets of this process, in every spelling they can take in text and JSON."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._data: list[bytes] = []

    def add(self, secret: str) -> None:
        """Register a secret. One shorter than MIN_LENGTH ("EMPTY", "dummy": what local
        servers are given) is no secret, and replacing it everywhere would garble answers."""
        if len(secret) < MIN_LENGTH or secret in self._text:
            return
        escaped = orjson.dumps(secret).decode()[1:-1]  # as it appears inside a JSON string
        for spelling in dict.fromkeys((secret, escaped)):
            self._text.append(spelling)
            self._data.append(spelling.encode("utf-8", "surrogatepass"))

    def clear(self) -> None:
        self._text.clear()
        self._data.clear()

    def __bool__(self) -> bool:
        return bool(self._text)

    def text(self, value: str) -> str:
        for s in self._text:
            if s in value:
                value = value.replace(s, REDACTED)
        return value

    def data(self, value: bytes) -> bytes:
        """Bytes about to be written; the check is one substring search per spelling
        (bytes.find: on 3.11 `in` first tries the operand as an int, a formatted TypeError
        on every write)."""
        for s in self._data:
            if value.find(s) >= 0:
                value = value.replace(s, _REDACTED_BYTES)
        return value


SECRETS = Secrets()
