"""Perplexity on calibration-source validation windows of the dense model with given blocks removed.

    .venv/bin/python benchmarks/removal_calib_ppl.py 4,13,14,15,16,17,18 15,16,17,18,19,20,26 [--windows 16]

Picks a layer-selection hyperparameter (TRSP's λ1) without looking at the held-out evaluation splits: the
windows are drawn from the calibration source (SOTU 1790–1999) with a seed other than the calibration
set's, and each set of blocks is removed by masking its gates (exactly removal; tests/unit/test_layer_prune.py).
No stage 2: this measures the selection alone.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from squeezeflow.calibration import load_text, sample_windows, tokenize_source
from squeezeflow.methods.layers.gates import gate_model
from squeezeflow.models import load_model, load_tokenizer, prepare_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sets", nargs="+", help="comma-separated block indices, one set per argument")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1, help="not the calibration set's seed (0)")
    ap.add_argument("--json")
    args = ap.parse_args()

    resolved = prepare_model(args.model)
    model = load_model(resolved.path).eval()
    gates = gate_model(model)
    ids = tokenize_source(load_text("sotu-calib"), load_tokenizer(resolved.path))
    windows = sample_windows(ids, args.windows, args.seqlen, args.seed)
    rows = {}
    for s in args.sets:
        removed = [int(i) for i in s.split(",")]
        for i, g in enumerate(gates):
            g.masked = i in removed
        with torch.no_grad():
            loss = sum(float(model(input_ids=w[None], labels=w[None], use_cache=False).loss) for w in windows)
        rows[s] = round(math.exp(loss / len(windows)), 3)
        print(f"removed {s}: calibration-source perplexity {rows[s]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "perplexity": rows}, f, indent=1)


if __name__ == "__main__":
    main()
