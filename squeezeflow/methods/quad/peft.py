"""QUAD's parameter-efficient tune: after quantization, train only the fp16 outlier weights (w_outlier)
and the per-channel weight scales of every "quad" layer, with the next-token loss on calibration text,
through the activation fake-quant (a straight-through estimator, kernels/quad_linear.py). The integer
codes, embeddings, norms and lm_head stay frozen. The tuned tensors replace the originals in a new
packed checkpoint; everything else is copied byte for byte.

The paper tunes on instruction data; none exists here, so it tunes on the calibration windows (AdamW,
lr 1e-5 by default, one window per step in a seeded order).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ...kernels.quad_linear import QuadLinear
from ...rng import isolated_rng

TUNED_FIELDS = ("scales", "w_outlier")


def _make_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Turn each QuadLinear's scales and w_outlier buffers into fp32 parameters; freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    params: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuadLinear):
            continue
        module.cache_dequantized = False
        for field in TUNED_FIELDS:
            buf = module._buffers.pop(field)
            if buf.numel() == 0:   # writers have no outlier columns
                module.register_buffer(field, buf)
                continue
            param = nn.Parameter(buf.detach().float().clone())
            module.register_parameter(field, param)
            params[f"{name}.{field}"] = param
    return params


@isolated_rng
def tune_packed(src: Path, dst: Path, windows: torch.Tensor, steps: int, lr: float, seed: int,
                device: torch.device | str = "cpu") -> dict:
    """Tune the packed QUAD checkpoint `src` into `dst`, training on `device`; returns the training record."""
    from safetensors.torch import load_file, save

    from ...models import load_model
    from ...store import canonical_json, canonical_safetensors

    torch.manual_seed(seed)
    model = load_model(src, torch.float32).to(device)
    model.train()
    params = _make_trainable(model)
    if not params:
        raise ValueError(f"{src} has no QUAD layers to tune")
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    # A host generator draws on the host (it cannot draw on a device): the same window order everywhere.
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed), device="cpu")
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        ids = windows[order[step % len(windows)]].unsqueeze(0).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    record = {"steps": steps, "lr": lr, "seed": seed, "optimizer": "AdamW", "windows": len(windows),
              "seqlen": int(windows.shape[1]), "trained": list(TUNED_FIELDS),
              "loss_first10": round(sum(losses[:10]) / max(1, len(losses[:10])), 6),
              "loss_last10": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 6),
              "seconds": round(time.perf_counter() - t0, 1)}

    tensors = load_file(src / "model.safetensors")
    for key, param in params.items():
        if key not in tensors:   # the task model names modules "model.layers..." like the checkpoint
            raise KeyError(f"tuned tensor {key} is not in {src / 'model.safetensors'}")
        tensors[key] = param.detach().to("cpu", tensors[key].dtype).contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.safetensors").write_bytes(canonical_safetensors(save(tensors, metadata={"format": "pt"})))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["peft"] = {k: v for k, v in record.items() if k != "seconds"}
    (dst / "config.json").write_bytes(canonical_json(config))
    for f in sorted(src.iterdir()):
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copyfile(f, dst / f.name)
    return record
