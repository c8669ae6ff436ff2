"""Several models and samples per line: the input staged once per model, a line per unit.

`--models A,B --samples N` never changes what a run is: each model gets a standard output
directory (`dir_name`), and in it `units.jsonl`, the input with every line written N times
(sample k: `custom_id#k`, `seed` = the line's seed, 0 when none, + k on the routes that take
one; the model replaced by the directory's). That directory is then an ordinary job on an
ordinary input, so its journal unit is (line, sample) for free: resume, budgets,
never-re-send, status, merge, export and resend hold per unit as they hold per line.

The numbering is fixed so that a unit finds its input line without a table: input line L's
sample k is line (L - 1) * N + k + 1 of `units.jsonl` (a blank input line becomes N blank
lines), and `sample_of` gives k back from that line. With N = 1 the line numbers and
custom_ids are the input's own. As with labelling and tables, resume recognises the staged
file by its bytes: the same input and options give the same file, other ones are refused.

How the N units of a line are sent is the run's choice, not the staging's (`--samples-via`):
with `n` (the default) `grouped` gathers a line's units that still need an answer into one
request whose body asks for that many choices, where the route takes `n` (chat and
completions, not streamed, the line not asking for `n` itself) and the server has not shown
it ignores or refuses it; the answer's choices are then the units' answers, one each. With
`seed`, and wherever `n` cannot be used, each unit is its own request with its own seed.
Either way the journal, outcomes, spend and cache entries stay per unit.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import orjson

from tmbatch.base.config import ConfigError
from tmbatch.base.files import atomic_write, make_dir
from tmbatch.inputs.files import open_input
from tmbatch.inputs.reader import MAX_LINE_BYTES, BadLine, Request, read_requests
from tmbatch.inputs.templates import Digest, write_staged

log = logging.getLogger("tmbatch")
SHOWN = 5  # bad input lines named one by one in the refusal; the rest are counted
MAX_DIR_NAME = 255  # bytes in a file name on every common filesystem
MANIFEST = "models.json"  # in -o: the input, the samples, each model's directory, the options
UNITS = "units.jsonl"  # the staged input of a directory of several models or samples
SAMPLE_SEP = "#"  # custom_id + "#" + k: sample k's id (unique in its directory)
# The routes whose bodies take `seed` (OpenAI's and vLLM's chat and completions): a
# /v1/responses body has no such field in OpenAI's API, and /tokenize none at all
SEEDED = frozenset(("/v1/chat/completions", "/v1/completions"))


def dir_name(model: str) -> str:
    """The model's directory under -o: the name percent-encoded (RFC 3986: every byte but
    letters, digits and `-._~` becomes %XX), so `org/model` is `org%2Fmodel`; a leading `.`
    is encoded too (no hidden, `.` or `..` directory). `model_of_dir` reverses it."""
    name = quote(model, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if not model or len(name.encode()) > MAX_DIR_NAME:
        raise ConfigError(f"--models: model {model!r} cannot name a directory (empty, or "
                          f"longer than {MAX_DIR_NAME} bytes once encoded)")
    return name


def model_of_dir(name: str) -> str:
    """The model a directory made by `dir_name` is for."""
    return unquote(name)


def sample_of(line: int, samples: int) -> int | None:
    """Sample k of a line of a staged `units.jsonl` (None without --samples)."""
    return (line - 1) % samples if samples > 1 else None


def sampled(items: Iterator[Request | BadLine], samples: int) -> Iterator[Request | BadLine]:
    """The directory's requests, each told its sample index (for its outcome line and its
    cache key)."""
    for item in items:
        if isinstance(item, Request):
            item.sample = (item.line - 1) % samples
        yield item


VIA = ("n", "seed")  # --samples-via: how a line's N units are sent


def takes_n(req: Request) -> bool:
    """Whether `req`'s route and body let its sample's siblings share one request through
    `n`: chat and completions, not streamed (a stream's choices interleave), and not a line
    that asks for `n` itself (its N samples are then N requests of `n` choices each)."""
    n = req.body.get("n")
    return req.url in SEEDED and not req.stream and (n is None or n == 1)


def as_one(units: list[Request]) -> Request:
    """Units of one input line as one request: the first unit's body (its seed) with `n` =
    how many, under an Idempotency-Key of its own (another set of units is another
    request). One unit is itself."""
    if len(units) == 1:
        return units[0]
    first = units[0]
    body = dict(first.body)
    body["n"] = len(units)
    key = f"{first.key_id or first.custom_id}+n{len(units)}"
    return Request(first.line, first.custom_id, first.url, body, key_id=key,
                   units=tuple(units))


def grouped(items: Iterator[Request | BadLine], samples: int,
            joins: Callable[[Request], bool]) -> Iterator[Request | BadLine]:
    """The units of each input line that `joins` accepts, as one request (`as_one`); the
    others as they come. Only consecutive units of one line join (a resume has skipped
    the done ones), so the reader is still read one line at a time."""
    group: list[Request] = []
    for item in items:
        joined = isinstance(item, Request) and joins(item)
        if group and (not joined or (item.line - 1) // samples != (group[0].line - 1) // samples):
            yield as_one(group)
            group = []
        if joined:
            group.append(item)
            if (item.line - 1) % samples == samples - 1:  # the line's last unit
                yield as_one(group)
                group = []
            continue
        yield item
    if group:
        yield as_one(group)


def split_choices(body: dict[str, Any], units: int) -> list[dict[str, Any]]:
    """An answer with `n` choices as one answer per unit, in the order of the choices'
    `index` (at most `units` of them): each the whole body with its one choice (as index
    0, the shape of an answer to one request). The request's usage is the first one's and
    the others' usage is 0, so the outcome lines add up to what was billed."""
    raw = body.get("choices")
    choices = [c for c in raw if isinstance(c, dict)] if isinstance(raw, list) else []
    choices.sort(key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)
    usage = body.get("usage")
    none = {k: 0 for k, v in usage.items() if isinstance(v, int)} \
        if isinstance(usage, dict) else usage
    return [{**body, "choices": [{**c, "index": 0}], "usage": usage if k == 0 else none}
            for k, c in enumerate(choices[:units])]


def units(items: Iterator[Request | BadLine], samples: int,
          joins: Callable[[Request], bool] | None) -> Iterator[Request | BadLine]:
    """A directory's requests as its run sends them: each told its sample, and with
    `joins` (--samples-via n) a line's units that it accepts as one request."""
    if samples == 1:
        return items
    items = sampled(items, samples)
    return items if joins is None else grouped(items, samples, joins)


def unit_line(req: Request, model: str | None, samples: int, k: int) -> bytes:
    """Input line `req`'s sample k for `model` (None: the line's own), as a Batch line."""
    body = dict(req.body)
    if model is not None:
        body["model"] = model
    cid = req.custom_id
    if samples > 1:
        if req.url in SEEDED:
            seed = body.get("seed")
            base = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
            body["seed"] = base + k
        cid = f"{cid}{SAMPLE_SEP}{k}"
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": req.url, "body": body},
                        option=orjson.OPT_APPEND_NEWLINE)


def _units(items: Iterable[Request | BadLine], model: str | None, samples: int, out: Any,
           bad: list[BadLine]) -> int:
    """Write every unit of `items` to `out`; bad input lines go to `bad`. Returns the lines."""
    last, lines = 0, 0
    for item in items:
        if item.line > last + 1:  # blank input lines: N blank lines keep the numbering
            out.write(b"\n" * ((item.line - last - 1) * samples))
        last = item.line
        if isinstance(item, BadLine):
            bad.append(item)
            out.write(b"\n" * samples)
            continue
        lines += 1
        for k in range(samples):
            out.write(unit_line(item, model, samples, k))
    return lines


def stage_units(source: str, target_dir: Path, model: str | None, samples: int, *,
                default_model: str | None, endpoint: str | None, stream: bool | None,
                restart: bool, max_line_bytes: int = MAX_LINE_BYTES) -> Path:
    """Write TARGET_DIR/units.jsonl for `model` (None: each line's own, else
    `default_model`), unless it holds those bytes already.

    An input with bad lines is refused here, naming them, before anything is written or sent:
    a bad line has no unit to fail in each directory under the same number."""
    def read(sink: Any, bad: list[BadLine]) -> int:
        with contextlib.closing(open_input(source)) as f:
            items = read_requests(f, endpoint=endpoint, model=model or default_model,
                                  stream=stream,
                                  max_line_bytes=max_line_bytes)
            return _units(items, model, samples, sink, bad)

    bad: list[BadLine] = []
    digest = Digest()
    lines = read(digest, bad)
    if bad:
        shown = "; ".join(b.message for b in bad[:SHOWN])
        more = f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else ""
        raise ConfigError(
            f"{source}: {len(bad)} bad line(s){more}: {shown}. --models and --samples check "
            f"the whole input before sending: fix these lines (`tmbatch validate {source}` "
            "lists them all); nothing was sent")
    make_dir(target_dir)
    target = target_dir / UNITS
    write_staged(target, digest, lambda out: read(out, []), restart=restart,
                 changed="another input or other --samples / --endpoint / --stream",
                 source=source)
    log.debug("%s: %d line(s) x %d sample(s) for %s -> %s", source, lines, samples, model,
              target)
    return target


def write_manifest(out_dir: Path, source: str, samples: int, models: list[tuple[str, str]],
                   options: dict[str, Any]) -> None:
    """OUTPUT/models.json: which directory holds which model, and what made them (the
    command that resumes them is rebuilt from it: `resume_command`)."""
    make_dir(out_dir)
    atomic_write(out_dir / MANIFEST, orjson.dumps({
        "input": source, "samples": samples,
        "models": [{"model": m, "dir": d} for m, d in models], "options": options,
    }, option=orjson.OPT_INDENT_2) + b"\n")


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """OUTPUT/models.json as written, or None (none there, or not one tmbatch wrote)."""
    try:
        manifest = orjson.loads((out_dir / MANIFEST).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    ok = isinstance(manifest, dict) and isinstance(manifest.get("models"), list) and \
        isinstance(manifest.get("input"), str) and isinstance(manifest.get("samples"), int)
    return manifest if ok else None


def resume_command(input_path: str, out_dir: Path) -> str | None:
    """The command that resumes a directory of a --models or --samples run: that run's own
    (its units are staged from the input again), or None for any other directory."""
    if Path(input_path).name != UNITS:
        return None
    top, manifest = out_dir, read_manifest(out_dir)  # --samples alone: -o itself
    if manifest is None or manifest["models"]:
        top, manifest = out_dir.parent, read_manifest(out_dir.parent)
        if manifest is None or not any(isinstance(m, dict) and m.get("dir") == out_dir.name
                                       for m in manifest["models"]):
            return None
    parts = ["tmbatch", "run", shlex.quote(manifest["input"]), "-o", shlex.quote(str(top))]
    if manifest["models"]:
        parts += ["--models", shlex.quote(",".join(str(m.get("model"))
                                                   for m in manifest["models"]))]
    if manifest["samples"] > 1:
        parts += ["--samples", str(manifest["samples"])]
    opts = manifest.get("options") or {}
    for key in ("endpoint", "model"):
        if opts.get(key):
            parts += [f"--{key}", shlex.quote(str(opts[key]))]
    if opts.get("stream") is not None:
        parts.append("--stream" if opts["stream"] else "--no-stream")
    if opts.get("shard"):
        parts += ["--shard", f"{opts['shard'][0]}/{opts['shard'][1]}"]
    return " ".join(parts)
