"""jobs/k8s manifests: valid against the Kubernetes schemas (kubernetes-validate, bundled, offline)
and consistent with tmbatch itself (its parser accepts the args, the job file loads, the grace
period covers the drain timeout, JOB_COMPLETIONS matches spec.completions)."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tmbatch.cli.jobfile import load_job
from tmbatch.cli.main import build_parser

if os.environ.get("CI"):  # CI installs the test extra: a missing validator must fail there
    import kubernetes_validate as kv
    import yaml
else:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")
    yaml = pytest.importorskip("yaml", reason="pip install -e '.[test]'")

K8S = ROOT / "jobs" / "k8s"
# The stated minimum (docs/container-and-kubernetes.md, each manifest's header): the oldest
# release whose schema has every field used (backoffLimitPerIndex, podFailurePolicy rules
# without onPodConditions), and the newest.
MINIMUM = "1.29"
VERSIONS = (f"{MINIMUM}.0", kv.latest_version())


def docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            out.append((path.name, doc))
    return out


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in docs() if d["kind"] == kind]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def all_workloads() -> list[dict[str, Any]]:
    return [d for _, d in docs() if d["kind"] in ("Job", "CronJob")]


def is_loader(doc: dict[str, Any]) -> bool:
    return doc["metadata"]["name"] == "tmbatch-input-loader"


def workloads() -> list[dict[str, Any]]:
    """The Jobs that run tmbatch itself (the input loader runs the image's python3)."""
    return [d for d in all_workloads() if not is_loader(d)]


def job_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]


def test_the_manifests_we_expect_are_there() -> None:
    kinds = sorted(d["kind"] for _, d in docs())
    assert kinds == ["ConfigMap", "CronJob", "Deployment", "Job", "Job", "Job",
                     "PersistentVolumeClaim", "Service"]
    assert any(d["spec"].get("completionMode") == "Indexed" for d in by_kind("Job"))


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schema(version: str) -> None:
    for name, doc in docs():
        kv.validate(doc, version, strict=True)  # raises with the path of the bad field
        assert name


def test_the_validator_does_reject_a_broken_manifest() -> None:
    doc = copy.deepcopy(by_kind("CronJob")[0])
    pod_spec(doc)["containers"][0]["imagePullPolicy "] = "Always"  # a typo'd field
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, VERSIONS[-1], strict=True)
    doc = copy.deepcopy(by_kind("CronJob")[0])
    pod_spec(doc)["terminationGracePeriodSeconds"] = "30"  # a string, not an integer
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, VERSIONS[-1], strict=True)


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """What the kubelet does with $(VAR) in args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def test_args_parse_with_tmbatch_and_grace_covers_the_drain() -> None:
    parser = build_parser()
    for doc in workloads():
        spec = pod_spec(doc)
        (container,) = spec["containers"]
        assert container["image"] == "tmbatch:latest" and "command" not in container
        env = {"JOB_NAME": "j-123", "JOB_COMPLETION_INDEX": "2"}
        ns = parser.parse_args(expand(container["args"], env))
        if ns.command == "run":
            drain = ns.drain_timeout if ns.drain_timeout is not None else 25.0
            assert spec["terminationGracePeriodSeconds"] >= drain + 5
            assert spec["restartPolicy"] == "Never"  # podFailurePolicy needs it
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_key_comes_from_a_secret_and_nothing_secret_is_inline() -> None:
    for doc in workloads():
        (container,) = pod_spec(doc)["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        for name, entry in env.items():
            if re.search(r"KEY|TOKEN|SECRET|PASSWORD", name):
                assert "value" not in entry, name
        if container["args"][0] == "run":
            ref = env["TENSORMESH_INFERENCE_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"]
            assert not any("api-key" in a and "file" not in a for a in container["args"])


def test_indexed_job_passes_its_completion_count_and_shards_its_output() -> None:
    (job,) = [d for d in by_kind("Job") if d["spec"].get("completionMode") == "Indexed"]
    (container,) = pod_spec(job)["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_COMPLETIONS"]["value"] == str(job["spec"]["completions"])
    assert "fieldRef" in env["JOB_COMPLETION_INDEX"]["valueFrom"]
    args = container["args"]
    assert any("$(JOB_COMPLETION_INDEX)" in a for a in args)
    outs = {expand(args, {"JOB_COMPLETION_INDEX": str(i)})[args.index("--output") + 1]
            for i in range(job["spec"]["completions"])}
    assert len(outs) == job["spec"]["completions"]  # one directory per shard
    (merge,) = [d for d in by_kind("Job") if pod_spec(d)["containers"][0]["args"][0] == "merge"]
    merge_ns = build_parser().parse_args(pod_spec(merge)["containers"][0]["args"])
    assert set(merge_ns.dirs) == outs


def test_cronjob_gives_every_scheduled_run_its_own_directory_and_job_id() -> None:
    (cron,) = by_kind("CronJob")
    (container,) = pod_spec(cron)["containers"]
    ns = build_parser().parse_args(expand(container["args"], {"JOB_NAME": "nightly-29001"}))
    assert ns.output.endswith("nightly-29001") and ns.job_id == "nightly-29001"
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['job-name']"


def test_configmap_job_file_loads_and_uses_absolute_paths(tmp_path: Path) -> None:
    (cm,) = by_kind("ConfigMap")
    mounted = {v["configMap"]["name"]: v["name"] for d in workloads()
               for v in pod_spec(d).get("volumes", []) if "configMap" in v}
    assert cm["metadata"]["name"] in mounted
    for name, text in cm["data"].items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        job = load_job(str(path))
        assert job.label is not None
        for key in ("input", "output"):
            assert job.values[key].startswith("/data/"), key


def test_the_stated_minimum_is_the_minimum() -> None:
    """Every manifest passes at MINIMUM (above); the release before it rejects one, so the
    minimum is not stated lower or higher than it is. The docs and each workload say it."""
    major, minor = MINIMUM.split(".")
    older = f"{major}.{int(minor) - 1}.0"
    rejected = []
    for name, doc in docs():
        try:
            kv.validate(doc, older, strict=True)
        except kv.ValidationError:
            rejected.append(name)
    assert rejected, f"every manifest passes {older}: lower MINIMUM and the docs"
    page = (ROOT / "docs" / "container-and-kubernetes.md").read_text()
    assert f"Kubernetes {MINIMUM}+" in page
    for path in K8S.glob("*job*.yaml"):
        assert f"Kubernetes {MINIMUM}+" in path.read_text(), path.name


def test_jobs_expire_and_mount_no_service_account_token() -> None:
    for doc in all_workloads():
        assert job_spec(doc)["ttlSecondsAfterFinished"] > 0, doc["metadata"]["name"]
        assert pod_spec(doc)["automountServiceAccountToken"] is False, doc["metadata"]["name"]


def test_exit_codes_a_retry_cannot_change_fail_the_job() -> None:
    """2 (configuration), 3 (fatal) and 6 (budget: a new pod has the same budget) fail the
    whole Job at once instead of being retried by backoffLimit."""
    from tmbatch.base.exitcodes import ExitCode

    for doc in workloads():
        if pod_spec(doc)["containers"][0]["args"][0] != "run":
            continue
        rules = job_spec(doc)["podFailurePolicy"]["rules"]
        fail_job = {v for r in rules if r["action"] == "FailJob"
                    for v in r.get("onExitCodes", {}).get("values", [])}
        assert {int(ExitCode(2)), int(ExitCode(3)), int(ExitCode(6))} <= fail_job
        assert not fail_job & {130, 143}  # a stopped run resumes in the next pod


def test_the_input_loader_writes_the_jobs_input_atomically(tmp_path: Path) -> None:
    """The loader's script, run for real against a file:// URL: the input lands where the
    job file reads it, complete, and no .part file is left."""
    import subprocess
    import sys

    (loader,) = [d for d in all_workloads() if is_loader(d)]
    (container,) = pod_spec(loader)["containers"]
    assert container["command"] == ["python3", "-c"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (cm,) = by_kind("ConfigMap")
    for text in cm["data"].values():
        assert f'input = "{env["INPUT_PATH"]}"' in text
    src = tmp_path / "src.jsonl"
    src.write_bytes(b'{"id": 1, "text": "good"}\n' * 1000)
    dest = tmp_path / "data" / "in" / "reviews.jsonl"
    p = subprocess.run([sys.executable, "-c", container["args"][0]], capture_output=True,
                       text=True, timeout=60, env={"INPUT_URL": src.as_uri(),
                                                   "INPUT_PATH": str(dest)})
    assert p.returncode == 0, p.stderr
    assert dest.read_bytes() == src.read_bytes()
    assert not list(dest.parent.glob("*.part"))
    assert "26000 bytes" in p.stdout


# -- Redis, metrics and the dashboard (docs/fleet.md) -------------------------------------------

def test_the_runs_share_redis_through_its_service_and_expose_their_metrics() -> None:
    """TMBATCH_REDIS_URL names redis.yaml's Service and port, which selects its Deployment's
    pods; --metrics-port, the container port and the scrape annotations agree."""
    from urllib.parse import urlsplit

    from tmbatch.cli.fleet import ENV_REDIS

    (deploy,) = by_kind("Deployment")
    (service,) = by_kind("Service")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (redis,) = deploy["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in redis["ports"]}
    (svc_port,) = service["spec"]["ports"]
    assert ports[svc_port["targetPort"]] == 6379
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    parser = build_parser()
    runs = [d for d in workloads() if pod_spec(d)["containers"][0]["args"][0] == "run"]
    assert {d["kind"] for d in runs} == {"Job", "CronJob"}
    for doc in runs:
        (container,) = pod_spec(doc)["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        url = urlsplit(env[ENV_REDIS])
        assert (url.scheme, url.hostname, url.port) == (
            "redis", service["metadata"]["name"], svc_port["port"])
        ns = parser.parse_args(expand(container["args"], {"JOB_NAME": "j-1",
                                                          "JOB_COMPLETION_INDEX": "0"}))
        meta = (doc["spec"]["jobTemplate"]["spec"]["template"] if doc["kind"] == "CronJob"
                else doc["spec"]["template"])["metadata"]
        notes = meta["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == ns.metrics_port
        assert {"name": "metrics", "containerPort": ns.metrics_port} in container["ports"]


def exported_names() -> set[str]:
    """Every series name the run's registry exports (run/metrics.py's collector, over a real
    admission with a paced lane, so the conditional families are there too)."""
    pytest.importorskip("prometheus_client")
    from tmbatch.limits.admission import Admission
    from tmbatch.run.metrics import Collector, Sources, Tally
    from tmbatch.run.summary import RunStats
    from tmbatch.spend.budget import Budget

    async def scrape() -> set[str]:  # the admission's lanes live on a running loop
        admission = Admission(rpm=60.0)
        admission.lane("tm-small")
        tally = Tally()  # one answer counted: the labelled families have samples
        tally.requests[("/v1/chat/completions", "tm-small", "200")] += 1
        tally.tokens[("tm-small", "prompt")] += 1
        collector = Collector(tally, Sources(RunStats(), admission, Budget(), lambda: 3))
        names = set()
        for family in collector.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
        return names

    import asyncio

    return asyncio.run(scrape())


def test_the_dashboard_queries_only_metrics_tmbatch_exports() -> None:
    import json

    dash = json.loads((K8S / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = {m for e in exprs for m in re.findall(r"\b(tmbatch_\w+)", e)}
    exported = exported_names()
    assert "tmbatch_pace_requests_per_second" in exported  # the conditional ones are there
    assert "tmbatch_lines_pending" in exported
    assert used and used <= exported, sorted(used - exported)
    # and every metric the docs list is on the dashboard
    assert {n for n in exported if not n.endswith(("_created",))} - used <= {
        "tmbatch_lines", "tmbatch_requests", "tmbatch_tokens", "tmbatch_refusals",
        "tmbatch_spend_usd", "tmbatch_request_duration_seconds"}
