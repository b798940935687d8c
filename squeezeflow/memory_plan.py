"""The preflight's memory plan: the peak memory of each stage of a job, estimated from the checkpoint's
tensor shapes (safetensors headers, nothing loaded) and the settings, against the memory this process may
use (the cgroup limit a pod runs under, else the machine's RAM; the GPU's memory for a CUDA job). A job
that will not fit is refused with the numbers before any work, instead of an out-of-memory kill hours in.

What each stage holds at its peak (b = bytes per element of the compute dtype):
- calibrate: the calibration tokens' embedding rows (b), the windows' hidden states, inputs and outputs of
  a block (fp32), and the LM head for gradient statistics.
- compress (per block): `memory.block_peak_bytes` per block in flight (one at the least), the block's
  statistics (XᵀX per distinct linear input, in the statistics dtype; while GPTQ solves, their fp32 means
  and one fp64 [in, in] of the widest input) and the hidden states.
- evaluate (streamed): one block and its dequantized copy, the head (a slice of it when large), every
  window's hidden state and 128 positions' logits; twice over with KL (the base model streams beside it). The cloze tasks load
  the packed model whole (its parameters and its dequantized linears in b).
- a fixed overhead (interpreter, torch, transformers, tokenizer), measured on this project's runs.
SQUEEZEFLOW_MEMORY_LIMIT (e.g. 16GiB) stands in for the host limit, as a pod's would.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import BadInput
from .evaluation.kl import _CHUNK_POSITIONS as KL_POSITIONS
from .evaluation.streamed import CHUNK_WINDOWS, POSITIONS, RESIDENT_HEAD, VOCAB_ROWS
from .memory import COMPUTE_BYTES, DEFAULT_FACTOR, DTYPE_BYTES, LIMIT_ENV, safetensors_header

# The peak RSS of a run on a 2-block, 64-wide model (imports, tokenizer, corpus, allocator workspaces),
# rounded up: what does not grow with the model.
FIXED_OVERHEAD = 1536 << 20
HEADROOM = 0.9
SOLVE_COPIES = 1  # fp64 [in, in] matrices a GPTQ-style solve holds beside the fp32 means (see compress_peak)


@dataclass(frozen=True)
class Shapes:
    """The checkpoint's parameter counts by role, and the sizes the stages' working sets depend on."""
    block_params: int          # the largest decoder block
    other_params: int          # embedding, final norm, head
    total_params: int
    hidden: int
    vocab: int
    linear_inputs: tuple[int, ...]  # in_features of each distinct linear input of the largest block


def shapes(model_path: Path, config) -> Shapes:
    blocks: dict[int, int] = {}
    other = 0
    inputs: dict[int, set] = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        for name, info in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            n = 1
            for d in info["shape"]:
                n *= d
            if name.startswith("model.layers."):
                block = int(name.split(".")[2])
                blocks[block] = blocks.get(block, 0) + n
                if name.endswith(".weight") and len(info["shape"]) == 2:
                    # Linears reading the same input (q/k/v, gate/up) share one XᵀX: key by module group.
                    group = ".".join(name.split(".")[3:5])
                    inputs.setdefault(block, set()).add((group, info["shape"][1]))
            else:
                other += n
    largest = max(blocks, key=blocks.get, default=0)
    return Shapes(block_params=blocks.get(largest, 0), other_params=other, total_params=sum(blocks.values()) + other,
                  hidden=int(config.hidden_size), vocab=int(config.vocab_size),
                  linear_inputs=tuple(sorted({i for _, i in inputs.get(largest, set())})))


@dataclass(frozen=True)
class StagePeak:
    stage: str
    bytes: int
    what: str


def compress_peak(s: Shapes, method, compute, acts: int = 0) -> StagePeak:
    """One block's compress peak (without the fixed overhead): the block × the method's working copies, its
    XᵀX statistics, the solver's copies and `acts` bytes of hidden states. placement.py asks it too."""
    b = COMPUTE_BYTES[compute.dtype]
    stats_b = 8 if compute.stats_dtype == "fp64" else 4
    factor = float(getattr(method, "memory_factor", DEFAULT_FACTOR))
    squares = sum(i * i for i in s.linear_inputs)
    stats = squares * stats_b if method.statistics or method.dense_statistics else 0
    # A method that solves against XᵀX (GPTQ): the sums become fp32 means (xtx.result consumes them), then
    # each linear in turn holds one fp64 [in, in] matrix beside its mean (gptq_core factors it in place).
    widest = max(s.linear_inputs, default=0)
    solve = 0
    if "xtx" in (method.statistics + method.dense_statistics):
        solve = SOLVE_COPIES * widest * widest * 8
        stats = max(stats, squares * 4 + solve)
    return StagePeak("compress", int(s.block_params * b * factor) + stats + acts,
                     f"one block ×{factor:g} working copies, its XᵀX statistics"
                     + (" and the solver's copies" if solve else "") + ", the hidden states")


def stage_peaks(s: Shapes, job) -> list[StagePeak]:
    from .methods.base import WeightMethod

    b = COMPUTE_BYTES[job.compute.dtype]
    tokens = job.calibration.n_samples * job.calibration.seqlen
    acts = 2 * tokens * s.hidden * 4
    method = job.weight_method
    # The embedding is read by rows (matrix_rows.py): only the calibration tokens'. Gradient statistics (GWQ)
    # backpropagate through the whole head, which they hold.
    gradients = any(str(n).startswith("gradients") for n in (getattr(method, "statistics", ()) or ())
                    + (getattr(method, "dense_statistics", ()) or ()))
    head = s.vocab * s.hidden * b
    peaks = [StagePeak("calibrate", tokens * s.hidden * b + acts + (head if gradients else 0),
                       "the calibration tokens' embedding rows, the windows' hidden states"
                       + (", the LM head (gradients)" if gradients else ""))]
    if isinstance(method, WeightMethod):
        peaks.append(compress_peak(s, method, job.compute, acts))
    # Layer removal, QUAD's rewrite and the training methods (TRSP, BackSlash, QUAD's PEFT) hold the whole
    # model in fp32, some of it several times over: they are not streamed, so the plan counts them whole.
    from .methods import TunesPacked, get_method

    for i, name in enumerate(job.recipe.methods[:job.structural]):
        copies = float(get_method(name).whole_model_fp32_copies)
        peaks.append(StagePeak(f"restructure-{i}", int(s.total_params * 4 * copies) + acts,
                               f"the whole model in fp32 ×{copies:g} ({name.method})"))
    for flag, stage in ((job.transforms, "transform"), (job.tunes, "tune")):
        if flag:
            # QUAD both transforms and tunes: its attribute is the transform's; tuning is TunesPacked's count.
            copies = float(TunesPacked.whole_model_fp32_copies if stage == "tune" else method.whole_model_fp32_copies)
            peaks.append(StagePeak(stage, int(s.total_params * 4 * copies) + acts,
                                   f"the whole model in fp32 ×{copies:g} ({stage})"))
    # Evaluation streams (evaluation/streamed.py): a block and its dequantized copy, the head (whole up to
    # RESIDENT_HEAD, else one slice of VOCAB_ROWS rows), every window's hidden state, POSITIONS positions'
    # logits; KL streams the base model beside it. Cloze tasks load the model whole.
    ev = job.evaluation
    windows = min(ev.max_windows or CHUNK_WINDOWS, CHUNK_WINDOWS)  # hidden states alive at once
    head_part = head if head <= RESIDENT_HEAD else VOCAB_ROWS * s.hidden * b
    # One slice's logits and their log-softmax (perplexity), or both models' logits and the fp64 positions KL
    # works in (evaluation/kl.py: ~5 tensors of KL_POSITIONS × V), all over the vocabulary.
    ppl_logits = 2 * POSITIONS * s.vocab * 4
    kl_logits = 2 * POSITIONS * s.vocab * 4 + 5 * KL_POSITIONS * s.vocab * 8
    one = 2 * s.block_params * b + head_part + windows * ev.seqlen * s.hidden * 4
    peaks.append(StagePeak("evaluate-fp32", one + ppl_logits, "one block, the head, the windows' hidden states"))
    if ev.cloze_items:
        peaks.append(StagePeak("evaluate", 2 * s.total_params * b + ppl_logits,
                               "the whole packed model with its dequantized linears (cloze tasks)"))
    elif ev.kl_windows:
        peaks.append(StagePeak("evaluate", 2 * one + max(ppl_logits, kl_logits),
                               "one block of the packed model and of the base model (KL), the heads, "
                               "the windows' hidden states"))
    else:
        peaks.append(StagePeak("evaluate", one + ppl_logits, "one block of the packed model, the head, "
                                                             "the windows' hidden states"))
    return [StagePeak(p.stage, p.bytes + FIXED_OVERHEAD, p.what) for p in peaks]


def host_limit() -> tuple[int, str]:
    """(bytes this process may use, where the number comes from)."""
    from .memory import cgroup_limit_bytes, env_limit_bytes

    limit = env_limit_bytes()
    if limit is not None:
        return limit, LIMIT_ENV
    cgroup = cgroup_limit_bytes()
    if cgroup is not None:
        return cgroup, "the cgroup memory limit"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the machine's RAM"


def device_limit(device: str) -> tuple[int, str] | None:
    if not device.startswith("cuda"):
        return None
    import torch

    _, total = torch.cuda.mem_get_info(torch.device(device))
    return int(total), f"{device}'s memory"


def host_beside_device(s: Shapes, job) -> int:
    """A CUDA job's host peak: the fixed overhead, one block on its way from the file to the device, the
    block's statistics (fp32) and the calibration windows' hidden states (fp32) on their way to the store."""
    stats = sum(i * i for i in s.linear_inputs) * 4
    acts = job.calibration.n_samples * job.calibration.seqlen * s.hidden * 4
    return FIXED_OVERHEAD + s.block_params * COMPUTE_BYTES[job.compute.dtype] + stats + acts


def plan(job, config) -> dict:
    """{"stages": [...], "peak": the largest, "limit": bytes, "limit_source": ...} for `squeezeflow plan`. On a
    GPU the stages' working sets live on the device (the fixed overhead stays on the host), and the host
    holds what `host_beside_device` counts: both must fit."""
    s = shapes(Path(job.model.path), config)
    peaks = stage_peaks(s, job)
    top = max(peaks, key=lambda p: p.bytes)
    limit, source = host_limit()
    out = {"stages": [asdict(p) for p in peaks], "peak": asdict(top), "limit_bytes": limit, "limit_source": source,
           "fits": top.bytes <= limit * HEADROOM}
    dev = device_limit(job.compute.device)
    if dev is not None:
        host = host_beside_device(s, job)
        out.update(device_peak_bytes=top.bytes - FIXED_OVERHEAD, host_peak_bytes=host, host_limit_bytes=limit,
                   host_limit_source=source, limit_bytes=dev[0], limit_source=dev[1],
                   fits=top.bytes - FIXED_OVERHEAD <= dev[0] * HEADROOM, host_fits=host <= limit * HEADROOM)
    return out


def check(job, config) -> dict:
    """The plan, or BadInput (one line, with the numbers) when its largest stage does not fit."""
    p = plan(job, config)
    if not p.get("host_fits", True):
        raise BadInput(f"{job.model.name} with {job.recipe.name} needs ~{p['host_peak_bytes'] / 2**30:.1f} GiB of host "
                       f"memory beside the GPU (a block, its statistics, the hidden states) but "
                       f"{p['host_limit_source']} is {p['host_limit_bytes'] / 2**30:.1f} GiB")
    if not p["fits"]:
        top = p["peak"]
        need = p.get("device_peak_bytes", top["bytes"])
        raise BadInput(f"{job.model.name} with {job.recipe.name} needs ~{need / 2**30:.1f} GiB at the "
                       f"{top['stage']} stage ({top['what']}, {job.compute.dtype}) but {p['limit_source']} is "
                       f"{p['limit_bytes'] / 2**30:.1f} GiB; use a larger machine, --dtype bf16, fewer calibration "
                       f"windows or fewer KL windows in the evaluation")
    return p
