#!/usr/bin/env bash
# Regenerate the image's lock files from pyproject.toml, every package pinned with the sha256
# of each of its files on PyPI (so the same lock installs on amd64 and arm64):
#
#   docker/requirements.lock        the runtime: [project] dependencies and the `fast` extra
#   docker/build-requirements.lock  the build stage only: [build-system] requires (setuptools)
#
#   docker/lock.sh                  # needs uv (in the test extra) and access to PyPI
#
# The Dockerfile installs them with `pip install --require-hashes --only-binary :all:`; a
# dependency added to pyproject.toml without re-running this fails tests/test_lock.py.
# For Python 3.11 on Linux: the image's Python (Debian 12, python:3.11-slim-bookworm).
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
common=(--generate-hashes --python-version 3.11 --python-platform linux --no-emit-index-url
        --custom-compile-command docker/lock.sh --quiet)
"$uv" pip compile "${common[@]}" --extra fast -o docker/requirements.lock pyproject.toml
python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(sys.stdin.buffer)["build-system"]["requires"]))' \
    <pyproject.toml | "$uv" pip compile "${common[@]}" -o docker/build-requirements.lock -
