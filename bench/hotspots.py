"""Summarise a py-spy `--format raw` profile: where the client's CPU goes, in percent.

    py-spy record -r 500 --format raw -o prof.txt -- python -m tmbatch run ...
    python bench/hotspots.py prof.txt [--top 30] [--match tmbatch/]

Inclusive time answers "what does this function cost with everything it calls";
self time finds the leaf that actually burns the CPU. Idle samples (the loop
waiting in select/epoll) are shown apart, so percentages are of busy time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

IDLE = ("select (selectors.py", "_run_once (asyncio/base_events.py", "poll (selectors.py")
_FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>.+?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    """`fn (path/to/file.py:12)` -> `fn (file.py)`: lines split one function into many rows."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    parts = f.split("/")
    tail = "/".join(parts[-2:]) if parts[-2:-1] in (["tmbatch"], ["aiohttp"], ["asyncio"]) \
        else parts[-1]
    return f"{m.group('fn')} ({tail})"


def summarise(path: str, top: int, match: str | None) -> str:
    incl: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = idle = 0
    with open(path) as f:
        for raw in f:
            stack, _, n = raw.rstrip("\n").rpartition(" ")
            count = int(n)
            frames = [short(x) for x in stack.split(";") if x]
            total += count
            if frames and any(frames[-1].startswith(i.split(" (")[0] + " (") and
                              i.split("(")[1].split(".py")[0] in frames[-1] for i in IDLE):
                idle += count
                continue
            if frames:
                self_[frames[-1]] += count
            for fr in set(frames):
                incl[fr] += count
    busy = max(total - idle, 1)
    out = [f"samples {total}, idle (waiting for I/O) {idle} ({100 * idle / max(total, 1):.1f} %), "
           f"busy {busy}", "", "## self time (% of busy)"]
    for fr, c in self_.most_common(top):
        out.append(f"{100 * c / busy:6.1f} %  {fr}")
    out += ["", "## inclusive time (% of busy)" + (f", frames matching {match!r}" if match else "")]
    rows = [(fr, c) for fr, c in incl.most_common() if not match or match in fr]
    for fr, c in rows[:top]:
        out.append(f"{100 * c / busy:6.1f} %  {fr}")
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--match", default=None, help="only inclusive rows whose frame contains this")
    a = p.parse_args()
    print(summarise(a.profile, a.top, a.match))


def children(path: str, parent: str) -> list[tuple[str, int]]:
    """Inclusive samples of each direct callee of `parent` (matched by prefix of the frame)."""
    kids: Counter[str] = Counter()
    with open(path) as f:
        for raw in f:
            stack, _, n = raw.rstrip("\n").rpartition(" ")
            frames = [short(x) for x in stack.split(";") if x]
            for i, fr in enumerate(frames):
                if fr.startswith(parent):
                    kids[frames[i + 1] if i + 1 < len(frames) else "<self>"] += int(n)
                    break
    return kids.most_common()
