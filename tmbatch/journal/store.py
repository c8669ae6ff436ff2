"""An output at an object-store URL: the bucket's objects, and the lease that is its lock.

A run whose `-o` is `s3://`, `gs://`, `az://` or `file://` keeps its output directory in a
local working directory and ships the journal to the bucket as numbered segments
(`journal.remote`); this module is the only code that talks to the store, through fsspec with
the credentials each filesystem reads itself (AWS env and profile, `AWS_ENDPOINT_URL` for
MinIO or R2; GCP application default; Azure env).

The lock. Two runs on one output URL would interleave their segments, so a run holds a lease:
the object `lock.json` under the URL, naming its owner (a random token, the host, the pid) and
when the lease lapses. It is created with a conditional write where the store has one
(S3 `If-None-Match: *`), renewed every third of its length while the run lives, and deleted at
the end. A run that finds a live lease of another owner stops before anything is read or sent;
one that finds a lapsed lease (its owner died without deleting it: kill -9, an evicted pod)
takes it over, and reads it back to make sure it won. A run that finds at renewal that the
lease is no longer its own stops sending (`LeaseLost`).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from tmbatch.base.exitcodes import ExitCode
from tmbatch.base.files import OutputError
from tmbatch.base.urls import URL_EXTRAS, url_scheme
from tmbatch.journal.format import JournalError

log = logging.getLogger("tmbatch")

LEASE = "lock.json"
SEGMENTS = "segments"
LEASE_SECONDS = 30.0  # a dead run's lease lapses this long after its last renewal


class StoreError(OutputError):
    """The object store cannot be reached or refused a write; the run must stop (exit 4)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.IO)


class LeaseLost(StoreError):
    """Another process holds this output's lease now: this one must stop writing."""


def is_remote(output: str | None) -> bool:
    """Whether an output names an object-store URL (http(s) is for inputs only)."""
    scheme = None if output is None else url_scheme(output)
    return scheme is not None and scheme not in ("http", "https")


class Store:
    """One output URL's objects: segments under `segments/`, the lease, the published
    files. Every call is synchronous (fsspec's), for a thread or a command."""

    def __init__(self, url: str) -> None:
        scheme = url_scheme(url) or ""
        if scheme in ("http", "https"):
            raise OutputError(f"{url}: an output must be a bucket (s3://, gs://, az://, "
                              "file://), not a web address")
        self.url = url.rstrip("/")
        extra = URL_EXTRAS.get(scheme)
        try:
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        except ImportError:
            how = f"pip install 'tmbatch[{extra}]'" if extra else "pip install fsspec"
            raise OutputError(f"{url}: writing to {scheme}:// needs its filesystem: {how}"
                              ) from None
        except ValueError as exc:
            raise OutputError(f"{url}: {exc}") from None
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    # -- objects --------------------------------------------------------
    def put(self, name: str, data: bytes) -> None:
        """One object, whole: a reader sees the old one or the new one, never half (a local
        filesystem writes a temporary name and renames it, as a bucket's PUT is atomic)."""
        target = self.path(name)
        try:
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = f"{target}.tmp-{secrets.token_hex(4)}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            else:
                self.fs.pipe_file(target, data)
        except Exception as exc:  # credentials, network, permissions: said once, exit 4
            raise StoreError(f"cannot write {self.where(name)}: {_why(exc)}") from None

    def put_file(self, name: str, local: Path) -> None:
        """A local file as one object, streamed (a multipart upload on S3); whole or not at
        all, as `put`."""
        target = self.path(name)
        try:
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = f"{target}.tmp-{secrets.token_hex(4)}"
                shutil.copyfile(local, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            else:
                self.fs.put_file(str(local), target)
        except Exception as exc:
            raise StoreError(f"cannot write {self.where(name)}: {_why(exc)}") from None

    def get_file(self, name: str, local: Path) -> bool:
        """An object streamed into a local file; False when there is none."""
        try:
            self.fs.get_file(self.path(name), str(local))
            return True
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise StoreError(f"cannot read {self.where(name)}: {_why(exc)}") from None

    def copy(self, name: str, to: str) -> None:
        """An object copied within the store (server-side on a bucket)."""
        try:
            if self.local:
                os.makedirs(os.path.dirname(self.path(to)), exist_ok=True)
                shutil.copyfile(self.path(name), self.path(to))
            else:
                self.fs.copy(self.path(name), self.path(to))
        except Exception as exc:
            raise StoreError(f"cannot copy {self.where(name)}: {_why(exc)}") from None

    def get(self, name: str) -> bytes | None:
        """An object's bytes, or None when there is none."""
        try:
            return bytes(self.fs.cat_file(self.path(name)))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StoreError(f"cannot read {self.where(name)}: {_why(exc)}") from None

    def get_many(self, names: list[str]) -> dict[str, bytes]:
        """Several objects at once (fsspec fetches them concurrently); a missing one is left
        out."""
        if not names:
            return {}
        paths = {self.path(n): n for n in names}
        try:
            got = self.fs.cat(list(paths), on_error="omit")
        except Exception as exc:
            raise StoreError(f"cannot read {self.url}: {_why(exc)}") from None
        by_path = {str(k).rstrip("/"): v for k, v in got.items()}
        out = {}
        for path, name in paths.items():
            data = by_path.get(path) if path in by_path else by_path.get(path.split("://")[-1])
            if isinstance(data, bytes | bytearray):
                out[name] = bytes(data)
        return out

    def listing(self, prefix: str) -> list[str]:
        """The names of the objects under `prefix/`, fresh from the store (not fsspec's
        cache: another pod may have written since)."""
        try:
            self.fs.invalidate_cache()
            found = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise StoreError(f"cannot list {self.where(prefix)}: {_why(exc)}") from None
        return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in found)

    def remove(self, names: list[str]) -> None:
        if not names:
            return
        try:
            self.fs.rm([self.path(n) for n in names])
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise StoreError(f"cannot delete in {self.url}: {_why(exc)}") from None

    def create(self, name: str, data: bytes) -> bool:
        """Write an object only if none exists (a conditional write where the store has one);
        False when another was there first."""
        path = self.path(name)
        if self.local:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a filesystem without conditional writes
            if self.get(name) is not None:
                return False
            self.put(name, data)
            return True
        except Exception as exc:
            if "PreconditionFailed" in repr(exc) or "412" in str(exc):
                return False
            raise StoreError(f"cannot write {self.where(name)}: {_why(exc)}") from None


class Lease:
    """This run's hold on an output URL (the module docstring says how it works)."""

    def __init__(self, store: Store, seconds: float = LEASE_SECONDS) -> None:
        self.store = store
        self.seconds = seconds
        self.owner = secrets.token_hex(8)
        self.held = False

    def _body(self) -> bytes:
        return orjson.dumps({"owner": self.owner, "host": socket.gethostname(),
                             "pid": os.getpid(), "until": time.time() + self.seconds})

    def take(self) -> None:
        """Hold the lease, or raise JournalError naming the live run that holds it."""
        if self.store.create(LEASE, self._body()):
            self.held = True
            return
        other = self._wait_lapse(self._read())
        if other is not None:
            raise JournalError(
                f"another tmbatch process is using {self.store.url} (host "
                f"{other.get('host')}, pid {other.get('pid')}; its lease runs until "
                f"{time.strftime('%H:%M:%S', time.localtime(other['until']))}); wait for it "
                f"to finish or stop it first, or use another --output. A run that died "
                f"without releasing it lets go {self.seconds:g}s after its last renewal")
        # lapsed: its owner died. Take it over, then make sure no other taker won.
        log.warning("%s: taking over a lapsed lease (host %s, pid %s)", self.store.url,
                    None if other is None else other.get("host"),
                    None if other is None else other.get("pid"))
        self.store.put(LEASE, self._body())
        time.sleep(0.2)
        self.held = True
        self.check()

    def _wait_lapse(self, other: dict[str, Any] | None) -> dict[str, Any] | None:
        """The live lease's record, or None once it lapsed. A lease of a process of this host
        that is gone has lapsed at once; another is watched until its time runs out (its
        owner died: a replacement pod waits at most one lease) or is renewed (it lives)."""
        while other is not None:
            until = float(other.get("until", 0))
            here = _alive_here(other)
            if until <= time.time() or here is False:
                return None
            if here:
                return other  # a process of this host that runs: it holds the output
            time.sleep(min(1.0, max(0.05, until - time.time())))
            now = self._read()
            if now is not None and now.get("owner") == other.get("owner") and float(
                    now.get("until", 0)) != until:
                return now  # renewed: its owner is alive
            other = now
        return None

    def _read(self) -> dict[str, Any] | None:
        raw = self.store.get(LEASE)
        if raw is None:
            return None
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

    def check(self) -> None:
        """Raise LeaseLost when the lease is another process's now."""
        now = self._read()
        if now is None or now.get("owner") != self.owner:
            self.held = False
            raise LeaseLost(f"{self.store.url}: another process took this output's lease "
                            f"({LEASE}); this run stops sending")

    def renew(self) -> None:
        """Extend the lease (after checking it is still ours)."""
        self.check()
        self.store.put(LEASE, self._body())

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            now = self._read()
            if now is not None and now.get("owner") == self.owner:
                self.store.remove([LEASE])
        except StoreError as exc:
            log.warning("%s; it lapses by itself in %gs", exc, self.seconds)


def _alive_here(lease: dict[str, Any]) -> bool | None:
    """Whether the lease's owner, a process of this host, still runs; None for another
    host's (a pod's pid means nothing here)."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return None
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, another user's
    return True


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
