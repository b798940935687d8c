"""`squeezeflow submit` against a real Prefect server: a run of a deployment on a work pool with the
Kubernetes base job template (infra/k8s), started with the parameters asked for and the job variables
the memory plan gives (pod_plan.py). No worker picks it up: what a Kubernetes worker would render from
those variables is tests/unit/test_k8s_templates.py's concern."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

from prefect_fixtures import prefect_server  # noqa: F401  (fixture used by name)

REPO = Path(__file__).resolve().parents[2]


def test_submit_starts_a_run_with_the_planned_pod(prefect_server, smollm_path, capsys):  # noqa: F811
    from prefect import flow, get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from squeezeflow import cli

    tag = uuid.uuid4().hex[:8]
    pool, name = f"k8s-{tag}", f"submit-{tag}"
    template = json.loads((REPO / "infra" / "k8s" / "work-pool-template.json").read_text())
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes", base_job_template=template))
    try:
        flow.from_source(source=str(REPO), entrypoint="flows/compress.py:compress_flow").deploy(
            name=name, work_pool_name=pool, ignore_warnings=True, print_next_steps=False)
        capsys.readouterr()   # what deploying printed
        argv = ["submit", f"compress/{name}", "smollm2-135m", "--recipe", "gptq-w4g64", "--gpus", "2",
                "--dtype", "bf16", "--calib-samples", "32"]
        assert cli.main(argv + ["--dry-run", "--json"]) == 0
        planned = json.loads(capsys.readouterr().out)
        assert "flow_run" not in planned
        assert cli.main(argv + ["--json"]) == 0
        submitted = json.loads(capsys.readouterr().out)
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(uuid.UUID(submitted["flow_run"]["id"]))
            try:
                assert run.job_variables == planned["job_variables"] == submitted["job_variables"]
                assert run.job_variables["gpu_count"] == 2 and run.job_variables["memory_request"].endswith("Gi")
                assert run.parameters["compute"] == {"device": "cuda", "dtype": "bf16"}   # every GPU of the pod
                assert run.parameters["model"]["ref"] == "smollm2-135m"
                assert run.parameters["calibration"]["n_samples"] == 32 and run.parameters["recipe"] == "gptq-w4g64"
                assert run.state.is_scheduled()   # nothing ran: no worker polls this pool
            finally:
                client.delete_flow_run(run.id)
        assert cli.main(["submit", f"compress/missing-{tag}", "smollm2-135m", "--recipe", "rtn-w4g64"]) == 2
        assert "no deployment 'compress/missing-" in capsys.readouterr().err
    finally:
        with get_client(sync_client=True) as client:
            for d in client.read_deployments():
                if d.name == name:
                    client.delete_deployment(d.id)
            client.delete_work_pool(pool)
