"""Print the requirements pyproject.toml declares, one a line, for the image's dependency layer:
the build system's, the runtime dependencies, and those of the extras named on the command line.

    python3 docker/requirements.py pyproject.toml fast > requirements.txt

The Dockerfile installs these from pyproject.toml alone, before the source is copied, so a
change to tmbatch's code reuses the layer that holds its dependencies."""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        data = tomllib.load(f)
    project = data["project"]
    out = list(data.get("build-system", {}).get("requires", []))
    out += project.get("dependencies", [])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"{pyproject}: no extra named {extra!r}")
        out += optional[extra]
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
