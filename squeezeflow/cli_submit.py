"""`squeezeflow submit DEPLOYMENT MODEL --recipe R --gpus N`: start a run of a deployment (the Kubernetes
one: infra/k8s/prefect.yaml) in a pod sized by the memory plan (pod_plan.py). The job is validated and
planned here first, so a request the pod could not hold is refused before a pod is scheduled; `--dry-run`
prints the parameters and job variables without starting anything."""
from __future__ import annotations

from pathlib import Path


def cmd_submit(args, specs, print_json) -> int:
    from . import pod_plan
    from .config import ComputeSpec
    from .errors import BadInput
    from .job import validate
    from .models import load_config
    from .shards import parse_size
    from .terminal import safe_text

    if args.device:
        raise BadInput("--device is the pod's to choose: set --gpus (0: CPU, 1: one GPU, more: every GPU)")
    gpu_bytes = parse_size(args.gpu_memory) if args.gpu_memory else pod_plan.DEFAULT_GPU_MEMORY
    model_ref, calib, evaluation = specs(args)
    if Path(model_ref.ref).expanduser().exists():
        raise BadInput(f"{model_ref.ref!r} is a local path, which the pod cannot read: publish it to the registry "
                       f"or name a prepared model, an s3:// URI or a registry alias")
    dtype = args.dtype or "fp32"
    # Validated with this machine's CPU: the pod's device is the plan's question, not this machine's.
    job = validate(model_ref, args.recipe, calib, evaluation, ComputeSpec(device="cpu", dtype=dtype), args.max_shard_size)
    variables = pod_plan.job_variables(job, load_config(Path(job.model.path), job.model.trust_remote_code),
                                       args.gpus, gpu_bytes)
    parameters = {"model": model_ref.model_dump(mode="json"), "recipe": args.recipe,
                  "calibration": calib.model_dump(mode="json"), "evaluation": evaluation.model_dump(mode="json"),
                  "compute": {"device": pod_plan.device_for(args.gpus), "dtype": dtype}}
    if args.max_shard_size:
        parameters["destinations"] = {"max_shard_size": args.max_shard_size}
    out = {"deployment": args.deployment, "parameters": parameters, "job_variables": variables}
    if not args.dry_run:
        from .flows.deployments import start_run

        out["flow_run"] = start_run(args.deployment, parameters, variables)
    if args.json:
        print_json(out)
        return 0
    pod = ", ".join(f"{k}={v}" for k, v in variables.items())
    if args.dry_run:
        print(safe_text(f"{args.deployment}: a pod with {pod}"))
        print(" ".join(f"--job-variable {k}={_flag_value(v)}" for k, v in variables.items()))
    else:
        run = out["flow_run"]
        print(safe_text(f"flow run {run['name']} ({run['id']}) of {args.deployment} in a pod with {pod}"))
    return 0


def _flag_value(v) -> str:
    import json

    return v if isinstance(v, str) else json.dumps(v)


def add_parser(sub, run_flags) -> None:
    p = sub.add_parser("submit", help="start a deployment's run (Kubernetes) in a pod sized by the memory plan")
    p.add_argument("deployment", help="flow/deployment, e.g. compress/compress-k8s")
    p.add_argument("model", help="a prepared model, s3:// URI or registry alias (not a local path: the pod reads it)")
    p.add_argument("--recipe", required=True, help="preset name or recipe YAML")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the pod (default 1; 0: a CPU-only pod; several: "
                   "block tasks and GPTQ's calibration forward spread over them)")
    p.add_argument("--gpu-memory", help="memory of one of the cluster's GPUs (default 80GiB)")
    p.add_argument("--dry-run", action="store_true", help="print the parameters and job variables, start nothing")
    run_flags(p)
    p.set_defaults(fn=lambda args: cmd_submit(args, _cli("_specs"), _cli("_print_json")))


def _cli(name: str):
    from . import cli

    return getattr(cli, name)
