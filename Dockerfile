# tmbatch as a non-root image whose entrypoint is `tmbatch`, under tini.
#
#   docker build -t tmbatch:latest .
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work" -e TENSORMESH_INFERENCE_API_KEY \
#       tmbatch:latest run input.jsonl -o out/
#
# BASE is pinned by exact tag and by the digest of its multi-architecture index. Override it with
# --build-arg BASE=IMAGE: a newer patch release, a mirror, or any Debian 12 image with python3
# (3.11+) and python3-venv; docker/debian-base.sh makes one with debootstrap, no registry needed.
ARG BASE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
FROM ${BASE}

# PID 1 is tini: it passes SIGTERM and SIGINT on to tmbatch (which drains and exits 143/130;
# tini exits with tmbatch's code) and reaps zombies. Python as PID 1 would get no default
# signal actions from the kernel.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# uid 10001 by default, but any uid works (`--user "$(id -u):$(id -g)"` on a host-owned
# volume): nothing is written outside /work, and HOME and /work are writable by everyone
# (sticky, like /tmp), so a new named volume on /work is too.
RUN useradd --uid 10001 --user-group --home-dir /home/tmbatch --create-home \
        --shell /usr/sbin/nologin tmbatch \
    && chmod 1777 /home/tmbatch \
    && mkdir -p /work && chown 10001:10001 /work && chmod 1777 /work

ENV VIRTUAL_ENV=/opt/tmbatch/venv \
    PATH=/opt/tmbatch/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/home/tmbatch \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv "$VIRTUAL_ENV"

# Dependencies first, from pyproject.toml alone: a change to tmbatch's code reuses this layer.
COPY pyproject.toml docker/requirements.py /src/
RUN python3 /src/requirements.py /src/pyproject.toml fast > /src/requirements.txt \
    && pip install -r /src/requirements.txt

# Samples and job files, read-only for everyone.
COPY samples /opt/tmbatch/samples
COPY jobs /opt/tmbatch/jobs

# Then tmbatch itself, without touching the dependencies.
COPY README.md /src/
COPY tmbatch /src/tmbatch
RUN pip install --no-deps --no-build-isolation /src \
    && rm -rf /src/build /src/tmbatch.egg-info \
    && tmbatch --version

USER 10001:10001
WORKDIR /work
ENTRYPOINT ["/usr/bin/tini", "--", "tmbatch"]
CMD ["--help"]
