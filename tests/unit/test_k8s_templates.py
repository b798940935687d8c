"""infra/k8s: the Kubernetes work-pool base job template and the team-install manifests.

The template is rendered by prefect-kubernetes' own KubernetesWorkerJobConfiguration (what the worker
does for every flow run) and checked for the GPU limit, tolerations, node selector, image and S3
credentials taken from a Secret. The manifests are parsed, cross-checked (Service selectors, Secret
references, no inline credentials) and round-tripped through the Kubernetes client's models, which
catches misspelled or misplaced fields.
"""
from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
TEMPLATE = K8S / "work-pool-template.json"
TEAM = K8S / "team"
SECRETS = {"squeezeflow-postgres": {"password"},
           "squeezeflow-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "s3.json"}}  # what the README creates
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL", re.I)

pytest.importorskip("prefect_kubernetes")


# --- the work-pool base job template --------------------------------------------------------------

def template() -> dict:
    return json.loads(TEMPLATE.read_text())


class _NoAPI:
    def __getattr__(self, name):
        raise AssertionError(f"the template asked the Prefect API for {name}")


def render(values: dict) -> dict:
    """The Job manifest the worker would submit for a flow run of a deployment with job variables `values`."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    # The template references no blocks or Prefect variables, so the resolver needs no API: a client that
    # fails if touched keeps Prefect from starting a temporary server just to be asked nothing.
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template(), values,
                                                                                   client=_NoAPI()))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="brisk-otter", flow_id=uuid.uuid4()))
    return config.job_manifest


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_template_passes_the_servers_validation():
    """What `prefect work-pool create --base-job-template` checks: every placeholder has a variable."""
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(template())


def test_defaults_ask_for_one_gpu_on_a_gpu_node():
    job = render({})
    pod = job["spec"]["template"]["spec"]
    c = container(job)
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "squeezeflow"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert c["image"] == "squeezeflow:0.1.0"
    assert c["args"] and "prefect" in " ".join(c["args"])  # the worker filled in the flow-run command


def test_values_override_every_scheduling_knob():
    job = render({"image": "registry.example.com/squeezeflow:1.2.3", "gpu_count": 4,
                  "node_selector": {"gpu": "h100"},
                  "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                  "s3_secret_name": "team-s3", "s3_endpoint": "https://s3.example.com", "env": {"EXTRA": "1"}})
    pod = job["spec"]["template"]["spec"]
    c = container(job)
    assert c["image"] == "registry.example.com/squeezeflow:1.2.3"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"][0]["value"] == "ml"
    env = {e["name"]: e for e in c["env"]}
    assert env["SQUEEZEFLOW_S3_ENDPOINT"]["value"] == "https://s3.example.com"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["EXTRA"]["value"] == "1"  # the pool's `env` variable still reaches the pod


def test_credentials_only_from_the_secret():
    c = container(render({}))
    env = {e["name"]: e for e in c["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key], env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "squeezeflow-s3", "key": key}
    assert env["SQUEEZEFLOW_REGISTRY"]["value"].startswith("s3://")
    assert env["SQUEEZEFLOW_STORE"]["value"].startswith("s3://")  # a rescheduled pod resumes from S3
    assert "PREFECT__FLOW_RUN_ID" in env  # Prefect's own variables were merged in by the worker
    _no_plaintext_credentials(template())


def test_cpu_only_run():
    job = render({"gpu_count": 0, "node_selector": {}, "tolerations": []})
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == 0
    assert not job["spec"]["template"]["spec"]["nodeSelector"]


def test_rendered_job_is_a_valid_kubernetes_job():
    _roundtrip(render({}))


# --- the team install -----------------------------------------------------------------------------

def manifests() -> list[dict]:
    docs = []
    for path in sorted(TEAM.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((TEAM / "kustomization.yaml").read_text())
    files = {p.name for p in TEAM.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_every_object_is_named_and_typed():
    docs = manifests()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "StatefulSet", "Deployment", "Service", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "squeezeflow", d["metadata"]
    assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs)  # no duplicates


def _workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def test_services_select_pods_that_exist_and_ports_that_they_open():
    docs = manifests()
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        targets = [w for w in _workloads(docs) if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"Service {svc['metadata']['name']} selects no pods: {selector}"
        port_names = {p.get("name") for w in targets for c in w["spec"]["template"]["spec"]["containers"]
                      for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, (svc["metadata"]["name"], port)
    for w in _workloads(docs):
        if "selector" in w["spec"]:  # a workload's selector matches its own pod template
            assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        if w["kind"] == "StatefulSet":
            assert any(s["kind"] == "Service" and s["metadata"]["name"] == w["spec"]["serviceName"] for s in docs)


def _secret_refs(obj) -> list[tuple[str, str]]:
    """Every (secret name, key) a manifest reads: env valueFrom and secret volumes."""
    refs = []
    if isinstance(obj, dict):
        if "secretKeyRef" in obj:
            refs.append((obj["secretKeyRef"]["name"], obj["secretKeyRef"]["key"]))
        if "secret" in obj and isinstance(obj["secret"], dict) and "secretName" in obj["secret"]:
            refs += [(obj["secret"]["secretName"], item["key"]) for item in obj["secret"].get("items", [])]
        for v in obj.values():
            refs += _secret_refs(v)
    elif isinstance(obj, list):
        for v in obj:
            refs += _secret_refs(v)
    return refs


def test_secret_references_match_the_secrets_the_readme_creates():
    refs = _secret_refs(manifests())
    assert refs
    for name, key in refs:
        assert key in SECRETS.get(name, set()), f"secret {name}/{key} is not created by the README"
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, keys in SECRETS.items():
        assert f"create secret generic {name}" in readme
        for key in keys:
            assert f"--from-literal={key}=" in readme or f"--from-file={key}=" in readme, (name, key)
    assert not [d for d in manifests() if d["kind"] == "Secret"]  # never shipped, always created by the team


def _no_plaintext_credentials(obj) -> None:
    if isinstance(obj, dict):
        if "name" in obj and ("value" in obj or "valueFrom" in obj) and CREDENTIAL_NAME.search(str(obj["name"])):
            assert "value" not in obj, f"{obj['name']} is set inline; take it from a Secret"
        for v in obj.values():
            _no_plaintext_credentials(v)
    elif isinstance(obj, list):
        for v in obj:
            _no_plaintext_credentials(v)


def test_no_plaintext_credentials():
    _no_plaintext_credentials(manifests())
    text = "\n".join(p.read_text() for p in TEAM.glob("*.yaml")) + TEMPLATE.read_text()
    assert not re.search(r"(?i)(password|secret_?key|accesskey)\s*[:=]\s*['\"]?\w{6,}", text.replace("secretKeyRef", ""))


def test_worker_rbac_covers_what_the_worker_does():
    docs = manifests()
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefect-worker")
    sa = worker["spec"]["template"]["spec"]["serviceAccountName"]
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert {"kind": "ServiceAccount", "name": sa, "namespace": "squeezeflow"} in binding["subjects"]
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == binding["roleRef"]["name"])
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    for needed in [("batch", "jobs", "create"), ("batch", "jobs", "watch"), ("batch", "jobs", "delete"),
                   ("", "pods", "list"), ("", "pods", "watch"), ("", "pods/log", "get"), ("", "events", "list")]:
        assert needed in allowed, needed
    env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == "squeezeflow"  # a Role, not a ClusterRole
    assert env["PREFECT_API_URL"].startswith("http://prefect-server.")
    command = worker["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--pool") + 1] == "squeezeflow-k8s" and "kubernetes" in command


def test_prefect_server_uses_postgres():
    docs = manifests()
    server = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefect-server")
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT_SERVER_DATABASE_DRIVER"]["value"] == "postgresql+asyncpg"
    host = env["PREFECT_SERVER_DATABASE_HOST"]["value"]
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == host for d in docs)
    pg = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "postgres")
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    pg_env = {e["name"]: e for e in pg["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"] == env["PREFECT_SERVER_DATABASE_PASSWORD"]["valueFrom"]
    assert pg_env["POSTGRES_USER"]["value"] == env["PREFECT_SERVER_DATABASE_USER"]["value"]
    assert pg_env["POSTGRES_DB"]["value"] == env["PREFECT_SERVER_DATABASE_NAME"]["value"]


def test_work_pool_defaults_point_at_the_team_install():
    docs = manifests()
    props = template()["variables"]["properties"]
    svc, port = re.match(r"http://([a-z0-9-]+)\.squeezeflow\.svc\.cluster\.local:(\d+)$", props["s3_endpoint"]["default"]).groups()
    seaweed = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == svc)
    assert int(port) in [p["port"] for p in seaweed["spec"]["ports"]]
    assert props["s3_secret_name"]["default"] in SECRETS
    assert props["namespace"]["default"] == "squeezeflow"


# --- schema: every object through the Kubernetes client's models ----------------------------------

def _model_name(obj: dict) -> str:
    return obj["apiVersion"].split("/")[-1].capitalize() + obj["kind"]


def _roundtrip(obj: dict) -> None:
    """Deserialize into the client's model (required fields checked) and serialize back: a field the
    model does not know (a typo, or a field at the wrong level) is dropped and shows up as a difference."""
    client = pytest.importorskip("kubernetes_asyncio.client")

    async def through_models():  # the asyncio client's ApiClient wants a running loop
        async with client.ApiClient() as api:
            model = api._ApiClient__deserialize(obj, _model_name(obj))  # the client's own (private) deserializer
            return api.sanitize_for_serialization(model)

    back = asyncio.run(through_models())
    assert _lost(obj, back) == [], f"{obj['kind']}/{obj.get('metadata', {}).get('name')}: fields the model does not know"


# Fields the template inherits from prefect-kubernetes' default (Job fields placed in the pod spec,
# which Kubernetes ignores); not ours to fix.
_INHERITED = {"spec.template.spec.completions", "spec.template.spec.parallelism"}


def _lost(original, back, path: str = "") -> list[str]:
    if isinstance(original, dict):
        back = back if isinstance(back, dict) else {}
        out = []
        for k, v in original.items():
            p = f"{path}.{k}" if path else k
            if p in _INHERITED:
                continue
            if k not in back:
                out.append(p)
            else:
                out += _lost(v, back[k], p)
        return out
    if isinstance(original, list):
        return [x for i, v in enumerate(original) for x in _lost(v, back[i] if i < len(back or []) else None, f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("obj", manifests(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_manifest_matches_the_kubernetes_schema(obj):
    _roundtrip(obj)


# --- pods sized by the memory plan (pod_plan.py, `squeezeflow submit`) --------------------------------------

def _job(model, recipe="gptq-w4g32", dtype="fp32"):
    from squeezeflow.config import CalibrationSpec, ComputeSpec, EvalSpec, ModelRef
    from squeezeflow.job import validate

    return validate(ModelRef(ref=str(model)), recipe, CalibrationSpec(n_samples=8, seqlen=64),
                    EvalSpec(seqlen=64, max_windows=2), ComputeSpec(device="cpu", dtype=dtype))


def test_pod_variables_follow_the_plan_and_render_into_the_job(tiny_model):
    import math

    from squeezeflow import memory_plan, pod_plan
    from squeezeflow.models import load_config

    job, config = _job(tiny_model), load_config(tiny_model)
    s = memory_plan.shapes(tiny_model, config)
    one, two = pod_plan.job_variables(job, config, 1), pod_plan.job_variables(job, config, 2)
    gib = lambda v: int(v.removesuffix("Gi"))   # noqa: E731
    # The host share of a GPU job (planned on a machine without one), over the pod's preflight headroom.
    gpu_job = job.on(job.compute.model_copy(update={"device": "cuda:0"}))
    host = memory_plan.host_beside_device(s, gpu_job)
    assert gib(one["memory_request"]) == math.ceil(host / memory_plan.HEADROOM / 2**30)
    assert one["memory_request"] == one["memory_limit"] and one["gpu_count"] == 1 and "node_selector" not in one
    assert two["gpu_count"] == 2 and gib(two["memory_request"]) >= gib(one["memory_request"])
    cpu = pod_plan.job_variables(job, config, 0)
    cpu_peak = max(p.bytes for p in memory_plan.stage_peaks(s, job))
    assert cpu["memory_request"] == f"{math.ceil(cpu_peak / memory_plan.HEADROOM / 2**30)}Gi"
    assert cpu["node_selector"] == {} and cpu["tolerations"] == []

    manifest = render(two)
    resources = container(manifest)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 2
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == two["memory_request"]
    assert manifest["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    cpu_pod = render(cpu)["spec"]["template"]["spec"]
    assert not cpu_pod.get("nodeSelector") and not cpu_pod.get("tolerations")


def test_a_job_no_gpu_can_hold_is_refused_with_its_numbers(tiny_model):
    from squeezeflow import pod_plan
    from squeezeflow.errors import BadInput
    from squeezeflow.models import load_config

    with pytest.raises(BadInput, match=r"GiB of GPU memory at the \w+ stage .* over a 0\.0 GiB GPU"):
        pod_plan.job_variables(_job(tiny_model), load_config(tiny_model), 1, gpu_bytes=1 << 20)
    with pytest.raises(BadInput, match="--gpus"):
        pod_plan.job_variables(_job(tiny_model), load_config(tiny_model), -1)
