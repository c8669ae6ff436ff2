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
# The oldest release whose schema has every field used (backoffLimitPerIndex), and the newest.
VERSIONS = ("1.29.0", kv.latest_version())


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


def workloads() -> list[dict[str, Any]]:
    return [d for _, d in docs() if d["kind"] in ("Job", "CronJob")]


def test_the_manifests_we_expect_are_there() -> None:
    kinds = sorted(d["kind"] for _, d in docs())
    assert kinds == ["ConfigMap", "CronJob", "Job", "Job", "PersistentVolumeClaim"]
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
