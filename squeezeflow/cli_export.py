"""`squeezeflow export ARTIFACT --format compressed-tensors|hf --dest DIR [--push REPO_ID]` (squeezeflow/export.py)."""
from __future__ import annotations

from pathlib import Path


def cmd_export(args) -> int:
    from .cli import _print_json
    from .export import export

    dest = export(args.artifact, Path(args.dest), args.format, scale_dtype=args.scale_dtype,
                  zero_points=args.zero_points, push=args.push)
    out = {"path": str(dest), "format": args.format, **({"pushed_to": args.push} if args.push else {})}
    _print_json(out) if args.json else print(dest)
    return 0


def add_parser(sub) -> None:
    exp = sub.add_parser("export", help="write an artifact in another runtime's format (vLLM: compressed-tensors) "
                         "or as a Hub-ready folder")
    exp.add_argument("artifact", help="artifact directory, s3:// entry URI or model/recipe@alias")
    exp.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "hf"],
                     help="compressed-tensors: loads in plain transformers and vLLM; hf: the packed files + model card")
    exp.add_argument("--dest", required=True, help="output directory (must be empty or absent)")
    exp.add_argument("--push", metavar="REPO_ID", help="then upload the folder to this Hugging Face Hub model repo "
                     "(token: HF_TOKEN, or the Prefect Secret block named by SQUEEZEFLOW_HF_TOKEN_BLOCK)")
    exp.add_argument("--scale-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                     help="compressed-tensors scales (float16 holds ours exactly; bfloat16 rounds them)")
    exp.add_argument("--zero-points", default="padded", choices=["padded", "packed"],
                     help="asymmetric grids only: padded loads in transformers, packed is vLLM's layout")
    from .aws_blocks import add_flags

    add_flags(exp, store=False)  # an s3:// or alias ARTIFACT is read with these credentials
    exp.set_defaults(fn=cmd_export)
