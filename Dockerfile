# tmbatch as a non-root image whose entrypoint is `tmbatch`, under tini.
#
#   docker build -t tmbatch:latest .
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work" -e TENSORMESH_INFERENCE_API_KEY \
#       tmbatch:latest run input.jsonl -o out/
#
# Two stages. `build` installs the dependencies from docker/requirements.lock (every package
# pinned with its sha256: `pip install --require-hashes`) into a virtualenv that has no pip of
# its own, then builds tmbatch's wheel and installs it there. The runtime stage copies that
# virtualenv alone: pip, setuptools and wheel are in neither it nor the base Python
# (docker/no-pip.sh removes the base's). docs/container-and-kubernetes.md has the
# registry-less build (podman, debootstrap) and how to load the image into kind or minikube.
#
# BASE is pinned by exact tag and by the digest of its multi-architecture index. Override it with
# --build-arg BASE=IMAGE: a newer patch release, a mirror, or any Debian 12 image with python3
# (3.11) and python3-venv; docker/debian-base.sh makes one with debootstrap, no registry needed.
# Both stages use it, so the virtualenv's python3 link points at the same interpreter.
ARG BASE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The build tools (pip, setuptools) in a virtualenv of their own, from their own lock file.
COPY docker/build-requirements.lock docker/requirements.lock /src/docker/
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --only-binary :all: \
        -r /src/docker/build-requirements.lock

# Dependencies first, from the lock file alone: a change to tmbatch's code reuses this layer.
# `--require-hashes` refuses any file whose sha256 is not in the lock, and any package the
# lock does not pin (a dependency missing from it fails the build here).
RUN python3 -m venv --without-pip /opt/tmbatch/venv \
    && /opt/build/bin/pip --python /opt/tmbatch/venv/bin/python install \
        --require-hashes --only-binary :all: -r /src/docker/requirements.lock

# Then tmbatch itself, as a wheel, without touching the dependencies.
COPY pyproject.toml README.md /src/
COPY tmbatch /src/tmbatch
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation -w /src/dist /src \
    && /opt/build/bin/pip --python /opt/tmbatch/venv/bin/python install --no-deps \
        /src/dist/tmbatch-*.whl \
    && /opt/build/bin/pip --python /opt/tmbatch/venv/bin/python check \
    && /opt/tmbatch/venv/bin/tmbatch --version

FROM ${BASE}

# PID 1 is tini: it passes SIGTERM and SIGINT on to tmbatch (which drains and exits 143/130;
# tini exits with tmbatch's code) and reaps zombies. Python as PID 1 would get no default
# signal actions from the kernel. Then pip, setuptools and wheel leave the base's Python.
COPY docker/no-pip.sh /tmp/no-pip.sh
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
    && sh /tmp/no-pip.sh && rm /tmp/no-pip.sh \
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
    PYTHONDONTWRITEBYTECODE=1

# Samples and job files, read-only for everyone.
COPY samples /opt/tmbatch/samples
COPY jobs /opt/tmbatch/jobs

# The virtualenv the build stage made: the locked dependencies and tmbatch, no pip.
COPY --from=build /opt/tmbatch/venv /opt/tmbatch/venv
RUN tmbatch --version

USER 10001:10001
WORKDIR /work
ENTRYPOINT ["/usr/bin/tini", "--", "tmbatch"]
CMD ["--help"]
