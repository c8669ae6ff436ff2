# tmbatch as a non-root image whose entrypoint is `tmbatch`.
#   docker build -t tmbatch:latest .
#   docker run --rm -e TENSORMESH_INFERENCE_API_KEY -v "$PWD/data:/work" tmbatch:latest \
#       run /work/input.jsonl -o /work/out
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tmbatch ./tmbatch
RUN pip install --no-cache-dir --prefix=/install ".[fast]"

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin tmbatch \
    && mkdir -p /work && chown tmbatch:tmbatch /work
COPY --chown=tmbatch:tmbatch samples /opt/tmbatch/samples
COPY --chown=tmbatch:tmbatch jobs /opt/tmbatch/jobs
USER 10001:10001
WORKDIR /work
ENV PYTHONUNBUFFERED=1
# SIGTERM from Kubernetes reaches tmbatch directly (exec form): it drains and exits 143.
ENTRYPOINT ["tmbatch"]
CMD ["--help"]
