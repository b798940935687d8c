"""The `squeezeflow` command. Exit status: 0 success, 2 bad input (one line on stderr), 1 other failure.

Every command validates its input before heavy work; commands that run flows start the embedded
Prefect and S3 servers only when nothing else is configured (PREFECT_API_URL, SQUEEZEFLOW_REGISTRY...).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

from .cli_models import add_check_parser as add_models_check_parser
from .aws_blocks import add_flags as add_block_flags
from .aws_blocks import destination_fields
from .cli_next import eval_sources, print_next_steps
from .errors import BadInput, IntegrityError
from .store import check_store
from .terminal import safe_text
from .strict_types import int_in

DEMO_RECIPES = ("rtn-w4g64", "rtn-w3g64")
# Sized so the first demo finishes in well under 15 minutes on 2 cores (see README).
DEMO_CALIB_SAMPLES = 64
DEMO_EVAL_WINDOWS = 16


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _quiet_prefect_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TQDM_DISABLE", "1")


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def cmd_models_prepare(args) -> int:
    from .models import prepare_model

    m = prepare_model(args.name, force=args.force)
    out = {"name": m.name, "path": str(m.path), "fingerprint": m.fingerprint}
    _print_json(out) if args.json else print(f"{m.name}: {m.path} (fingerprint {m.fingerprint[:16]}…)")
    return 0


def cmd_data_prepare(args) -> int:
    from .calibration import prepare_corpora

    info = prepare_corpora(force=args.force)
    if args.json:
        _print_json(info)
    else:
        for name, split in sorted(info.get("splits", info).items()):
            if isinstance(split, dict) and "sha256" in split:
                print(f"{name}: {split.get('bytes', '?')} bytes, sha256 {split['sha256'][:16]}…")
    return 0


def _specs(args):
    from pydantic import ValidationError

    from .config import CalibrationSpec, EvalSpec, ModelRef, one_line

    try:
        calib_kwargs = {k: v for k, v in {"source": args.calibration, "n_samples": args.calib_samples,
                                          "seqlen": args.seqlen, "seed": args.seed}.items() if v is not None}
        eval_kwargs = {k: v for k, v in {"seqlen": args.seqlen, "max_windows": args.eval_windows,
                                         "splits": eval_sources(getattr(args, "eval", None))}.items() if v is not None}
        return (ModelRef(ref=args.model, trust_remote_code=args.trust_remote_code),
                CalibrationSpec(**calib_kwargs), EvalSpec(**eval_kwargs))
    except ValidationError as e:
        raise BadInput(one_line(e)) from None


def _compute(args):
    """--device / --dtype as a ComputeSpec (unresolved: preflight resolves it, and refuses CUDA not here)."""
    from pydantic import ValidationError

    from .config import ComputeSpec, one_line

    try:
        return ComputeSpec(**{k: v for k, v in {"device": args.device, "dtype": args.dtype}.items() if v is not None})
    except ValidationError as e:
        raise BadInput(one_line(e)) from None


def run_compress(model_ref, recipes, calib, evaluation, registry: str | None, store: str | None, publish: bool = True,
                 runner=None, compute=None, max_shard_size: str | None = None) -> list[dict]:
    """Preflight every recipe, then run the flow once per recipe on the configured Prefect server;
    `runner` (a runners.RunnerSpec, default: Prefect's thread pool) runs the per-block tasks."""
    from . import pipeline, runners

    for r in recipes:  # fail fast, before any server starts
        pipeline.preflight(model_ref, r, calib, evaluation, compute, max_shard_size)
    check_store(store)
    registry_uri = _start_servers(registry, publish)
    from .flows.compress import Destinations, compress_flow

    flow = runners.with_runner(compress_flow, runner or runners.RunnerSpec())
    results = []
    for spec in recipes:
        started = time.perf_counter()
        out = flow(model=model_ref, recipe=spec, calibration=calib, evaluation=evaluation, **_flow_compute(compute),
                   destinations=Destinations(store=store or "", registry=registry_uri or "", publish=publish,
                                             **destination_fields(),
                                             **({"max_shard_size": max_shard_size} if max_shard_size else {})))
        out["wall_s"] = round(time.perf_counter() - started, 2)
        results.append(out)
    return results


def _flow_compute(compute) -> dict:
    """The flows' `compute` parameter, only when one was asked for (a default run's parameters stay as they were)."""
    return {} if compute is None else {"compute": compute}


def _start_servers(registry: str | None, publish: bool) -> str | None:
    """The registry (checked reachable) and the Prefect API, embedded ones when nothing is configured."""
    from . import pipeline

    registry_uri = pipeline.registry_for(registry) if publish else None
    _quiet_prefect_env()
    from .services import ensure_prefect

    ensure_prefect()
    return registry_uri


def cmd_sweep(args) -> int:
    """Many recipes, one flow run: shared calibration, statistics and baseline; a comparison table."""
    from . import pipeline, runners
    from .evaluation.comparison import comparison_files

    model_ref, calib, evaluation = _specs(args)
    runner = _runner_spec(args)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not recipes:
        raise BadInput("--recipes needs at least one recipe")
    compute = _compute(args)
    for r in recipes:
        pipeline.preflight(model_ref, r, calib, evaluation, compute, args.max_shard_size)
    check_store(args.store)
    registry_uri = _start_servers(args.registry, not args.no_publish)
    from .flows.compress import Destinations
    from .flows.sweep import sweep_flow

    flow = runners.with_runner(sweep_flow, runner)
    out = flow(model=model_ref, recipes=recipes, calibration=calib, evaluation=evaluation, compute=compute,
               destinations=Destinations(store=args.store or "", registry=registry_uri or "",
                                         publish=not args.no_publish, **destination_fields(),
                                         **({"max_shard_size": args.max_shard_size} if args.max_shard_size else {})))
    if args.json:
        _print_json({"results": out["results"]})
    else:
        print(comparison_files(out["results"])["comparison.md"].decode(), end="")
    return 0


def _table(results: list[dict]) -> str:
    from .evaluation.report import split_label

    base = results[0]["results"][0]
    splits = list(base["perplexity"])
    head = ["recipe", *[f"ppl {split_label(s, splits)}" for s in splits], "bits/w", "sparsity", "size MiB", "wall s"]
    rows = [["fp32", *[f"{base['perplexity'][s]:.3f}" for s in splits], f"{base['bits_per_weight']:.2f}",
             f"{base.get('weight_sparsity', 0.0):.3f}", f"{base['size_bytes'] / 2**20:.1f}", "-"]]
    for r in results:
        m = r["results"][1]
        rows.append([m["recipe"], *[f"{m['perplexity'][s]:.3f}" for s in splits], f"{m['bits_per_weight']:.3f}",
                     f"{m.get('weight_sparsity', 0.0):.3f}", f"{m['size_bytes'] / 2**20:.1f}", f"{r['wall_s']:.1f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths]), *[fmt.format(*r) for r in rows]])


def _metrics_list(results: list[dict]) -> list[dict]:
    out = [results[0]["results"][0]]
    for r in results:
        out.append(dict(r["results"][1], speed=dict(r["results"][1].get("speed") or {}, wall_s=r["wall_s"])))
    return out


def cmd_compress(args) -> int:
    from .recipes import load_recipe

    model_ref, calib, evaluation = _specs(args)
    runner = _runner_spec(args)
    recipes = [r.strip() for r in args.recipe.split(",") if r.strip()]
    for r in recipes:
        load_recipe(r)
    results = run_compress(model_ref, recipes, calib, evaluation, args.registry, args.store, not args.no_publish,
                           runner=runner, compute=_compute(args), max_shard_size=args.max_shard_size)
    if args.json:
        _print_json({"results": _metrics_list(results)})
    else:
        print(_table(results))
        print_next_steps(results, args.store)
    return 0


def cmd_demo(args) -> int:
    from .calibration import prepare_corpora
    from .models import prepare_model
    from .settings import cache_home

    started = time.perf_counter()
    prepare_model("smollm2-135m")
    prepare_corpora()
    args.model = "smollm2-135m"
    args.calib_samples = args.calib_samples or DEMO_CALIB_SAMPLES
    args.eval_windows = args.eval_windows or DEMO_EVAL_WINDOWS
    model_ref, calib, evaluation = _specs(args)
    results = run_compress(model_ref, list(DEMO_RECIPES), calib, evaluation, args.registry, args.store,
                           compute=_compute(args))
    wall = time.perf_counter() - started
    history_file = cache_home() / "demo-history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else []
    history.append({"wall_s": round(wall, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    history_file.parent.mkdir(parents=True, exist_ok=True)
    history_file.write_text(json.dumps(history, indent=1))
    if args.json:
        _print_json({"results": _metrics_list(results), "demo": {"wall_s": round(wall, 1), "history": history}})
        return 0
    print(_table(results))
    print()
    for r in results:
        print(f"{r['results'][1]['recipe']}: {r['artifact']['uri']}")
    print()
    print(f"calibration: {calib.n_samples} × {calib.seqlen} tokens from {calib.source}; "
          f"evaluation: {evaluation.max_windows} windows × {evaluation.seqlen} tokens per split")
    print(f"demo wall time: {wall:.1f} s (first demo on this cache: {history[0]['wall_s']:.1f} s; "
          f"this run is {100 * wall / history[0]['wall_s']:.0f}% of it)")
    return 0


def cmd_deploy(args) -> int:
    """Register compress, sweep and recalibrate-nightly (cron) as deployments on a process work pool of the
    configured server."""
    _quiet_prefect_env()
    from .services import ensure_prefect

    api = ensure_prefect()
    from .flows.deployments import deploy_all

    deployments = deploy_all(pool=args.pool, cron=args.cron, nightly_cron=args.nightly_cron)
    out = {"deployments": deployments, "pool": args.pool, "api_url": api,
           "deployment_id": deployments["compress"]["id"]}  # the compress one, as before
    if args.json:
        _print_json(out)
    else:
        for name, d in deployments.items():
            when = f", schedule '{d['schedule']}'" if d["schedule"] else ""
            print(f"deployment {name}/{name} ({d['id']}) on pool {args.pool}{when}")
        print(f"start a worker: prefect worker start --pool {args.pool} --type process")
    return 0


def cmd_services(args) -> int:
    from . import services

    if args.action == "status":
        st = services.status()
        if args.json:
            _print_json(st)
        else:
            for name, s in st.items():
                print(f"{name}: {'running' if s.get('running') else 'stopped'}  {s.get('url', '')}")
    else:
        services.stop()
        print("stopped") if not args.json else _print_json(services.status())
    return 0


# ------------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------------
def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-samples", type=int_in(1, 100_000), help="calibration windows (default 128; demo 64)")
    p.add_argument("--seqlen", type=int_in(16, 1 << 20), help="tokens per calibration and evaluation window (default 512)")
    p.add_argument("--calibration", help="calibration source: named split, .txt/.jsonl file or dir, s3:// prefix")
    p.add_argument("--eval", help="evaluation sources, comma-separated, as for --calibration (default: two named splits)")
    p.add_argument("--eval-windows", type=int_in(1, 1_000_000), help="evaluation windows per held-out split (default 16)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1))
    p.add_argument("--registry", help="s3://bucket/prefix (default: the embedded SeaweedFS server)")
    p.add_argument("--store", help="artifact store: local dir or s3://bucket/prefix")
    p.add_argument("--max-shard-size", help="largest packed weight file, e.g. 2GB or 500MiB (default 5GB)")
    add_block_flags(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    p.add_argument("--device", help="auto (default: $SQUEEZEFLOW_DEVICE, else one GPU when present, else cpu), cpu, cuda (every visible GPU), cuda:N")
    p.add_argument("--dtype", help="compute precision of blocks: fp32 (default), bf16 or fp16")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (it is shown only when stderr is a terminal anyway)")


def _runner_flags(p: argparse.ArgumentParser) -> None:
    # No argparse `choices` for --runner: runners.parse_runner gives the one-line error, also for API callers.
    p.add_argument("--runner", help="where per-block tasks run: default (Prefect threads) or dask")
    p.add_argument("--dask-address", help="tcp://host:port of a running Dask scheduler (default: a local cluster)")
    p.add_argument("--dask-workers", type=int_in(1, 1024), help="local Dask cluster size (default: one per GPU, else 2)")


def _runner_spec(args):
    """--runner / --dask-address / --dask-workers, checked (scheduler reachable) before anything heavy."""
    from .runners import parse_runner

    return parse_runner(args.runner, args.dask_address, args.dask_workers)


def _progress_bar(args):
    """The flows' progress as a bar on stderr for commands that run flows (those with --no-progress);
    shown only when stderr is a terminal, so logs and pipes stay clean."""
    import contextlib

    from .progress import terminal_bar

    if not hasattr(args, "no_progress"):
        return contextlib.nullcontext()
    return terminal_bar(sys.stderr, enabled=False if args.no_progress else None)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors follow the CLI's contract: one line on stderr, exit status 2 (subcommand parsers
    inherit the class)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"squeezeflow: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="squeezeflow", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="prepare known models").add_subparsers(dest="action", required=True)
    prep = models.add_parser("prepare")
    prep.add_argument("name")
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(fn=cmd_models_prepare)
    add_models_check_parser(models)

    data = sub.add_parser("data", help="prepare corpora").add_subparsers(dest="action", required=True)
    dprep = data.add_parser("prepare")
    dprep.add_argument("--force", action="store_true")
    dprep.set_defaults(fn=cmd_data_prepare)

    demo = sub.add_parser("demo", help="end-to-end demo on embedded servers")
    _run_flags(demo)
    demo.set_defaults(fn=cmd_demo)

    comp = sub.add_parser("compress", help="compress a model with one or more recipes")
    comp.add_argument("model")
    comp.add_argument("--recipe", required=True, help="preset name(s), comma-separated, or a YAML file")
    comp.add_argument("--no-publish", action="store_true")
    _run_flags(comp)
    _runner_flags(comp)
    comp.set_defaults(fn=cmd_compress)

    from .cli_plan import add_parser as add_plan_parser
    from .cli_submit import add_parser as add_submit_parser

    add_plan_parser(sub, _run_flags)
    add_submit_parser(sub, _run_flags)

    from .cli_eval import add_eval_flags, cmd_eval
    from .cli_recipes import add_parser as add_recipes_parser

    add_recipes_parser(sub)

    ev = sub.add_parser("eval", help="re-evaluate an artifact with the protocol in its manifest")
    ev.add_argument("artifact", help="local artifact dir, s3:// entry URI or model/recipe@alias")
    ev.add_argument("--eval-windows", type=int_in(1, 1_000_000), help="override the number of windows per split")
    ev.add_argument("--kl-windows", type=int_in(0, 1_000_000), default=4, help="windows per split for KL / top-1 vs the base")
    ev.add_argument("--cloze-items", type=int_in(0, 1_000_000), default=0, help="items per zero-shot cloze task (0 = skip)")
    ev.add_argument("--speed", action="store_true", help="prefill/decode tokens/s against the base, as ratios")
    add_eval_flags(ev)
    add_block_flags(ev, store=False)
    ev.set_defaults(fn=cmd_eval)

    dep = sub.add_parser("deploy", help="register the compress, sweep and nightly recalibration flows as Prefect deployments")
    dep.add_argument("--pool", default="squeezeflow-process", help="process work pool (created if missing)")
    dep.add_argument("--cron", help="optional schedule of the compress deployment, e.g. '0 3 * * *'")
    dep.add_argument("--nightly-cron", default=os.environ.get("SQUEEZEFLOW_NIGHTLY_CRON", "0 2 * * *"),
                     help="schedule of recalibrate-nightly (default '0 2 * * *' or $SQUEEZEFLOW_NIGHTLY_CRON)")
    dep.set_defaults(fn=cmd_deploy)

    sw = sub.add_parser("sweep", help="many recipes on one model, one flow run, one comparison table")
    sw.add_argument("model")
    sw.add_argument("--recipes", required=True, help="comma-separated presets or YAML files")
    sw.add_argument("--no-publish", action="store_true")
    _run_flags(sw)
    _runner_flags(sw)
    sw.set_defaults(fn=cmd_sweep)

    from .cli_registry import add_parser as add_registry_parser

    add_registry_parser(sub)

    from .cli_export import add_parser as add_export_parser

    add_export_parser(sub)

    svc = sub.add_parser("services", help="the embedded Prefect and S3 servers")
    svc.add_argument("action", choices=["status", "stop"])
    svc.set_defaults(fn=cmd_services)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # --json may come anywhere on the line.
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    args = parser.parse_args(argv)
    args.json = want_json
    try:
        with _progress_bar(args):
            from .aws_blocks import apply_args

            apply_args(args)  # named prefect-aws blocks, loaded before any heavy work
            return args.fn(args)
    except BadInput as e:  # messages may quote registry or file content: escaped (squeezeflow/terminal.py)
        print(f"squeezeflow: error: {safe_text(e)}", file=sys.stderr)
        return 2
    except IntegrityError as e:
        print(f"squeezeflow: integrity error: {safe_text(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Store writes are atomic (temporary file, then rename), so nothing half-written is ever reused.
        print(f"squeezeflow: error: no space left on the device holding {e.filename or 'the artifact store'}; "
              "free space and rerun: finished stages are reused", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
