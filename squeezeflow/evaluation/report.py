"""The human report of one artifact (report/report.md) from its metrics and the fp32 baseline."""
from __future__ import annotations

CAVEAT_4BIT = ("SmolLM2-135M ships as GGUF Q4_1: its linear weights already sit on a 4-bit grid (blocks of "
               "32 inputs). 4-bit results here measure re-gridding an already 4-bit model; 3-bit and lower "
               "are the informative settings. The baseline is the dequantized fp32 model.")


def split_label(source: str, among=()) -> str:
    """A held-out split's short name for table headers: a named split as is, a file, directory or s3://
    prefix by its last path component (`my.txt`), unless another source in `among` has the same one (then
    the full source); the protocol lines below a table give the full source."""
    short = source.rstrip("/").rsplit("/", 1)[-1] or source
    if sum(1 for s in among if split_label(s) == short) > 1:
        return source
    return short


def _fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def render(metrics: dict, base: dict, lineage: dict, layer_errors: dict[str, dict]) -> str:
    splits = list(base["perplexity"])
    lines = [f"# {lineage['model']['name']} · {metrics['recipe']}", "",
             "| model | " + " | ".join(f"ppl {split_label(s, splits)}" for s in splits) + " | bits/weight | sparsity | size |",
             "|---" * (len(splits) + 4) + "|"]
    for m in (base, metrics):
        cells = [f"{m['perplexity'][s]:.3f}" for s in splits]
        lines.append(f"| {m['recipe']} | " + " | ".join(cells) + f" | {m['bits_per_weight']:.3f} | "
                     f"{m.get('weight_sparsity', 0.0):.3f} | {_fmt_size(m['size_bytes'])} |")
    calib = lineage["calibration"]
    lines += ["", "## Protocol", "",
              f"- Calibration: {calib['n']} windows × {calib['seqlen']} tokens from `{calib['source']}` "
              f"(seed {calib['seed']}, text sha256 {calib['text_sha256'][:16]}…).",
              "- Perplexity: exp(mean next-token NLL) of the packed model loaded with `from_pretrained`, "
              "no BOS, each window scored alone."]
    for split, p in metrics["protocol"]["evaluation"].items():
        label = split_label(split, metrics["protocol"]["evaluation"])
        name = f"`{split}`" if label == split else f"`{label}` (`{split}`)"
        lines.append(f"- {name}: {p['windows']} windows × {p['seqlen']} tokens ({p['selection']}) "
                     f"of {p['corpus_tokens']} tokens; corpus sha256 {p['corpus_sha256'][:16]}…")
    lines.append("- Bits per weight: bytes of every stored field of the targeted linears (codes, scales, zeros, "
                 "masks, values, indices, codebooks, norms) × 8 / their weight count. Sparsity: the fraction of "
                 "those weights the checkpoint does not store. Embeddings, norms and lm_head stay fp32 and count "
                 "in size only.")
    if lineage["model"]["name"].startswith("smollm2"):
        lines += ["", f"> {CAVEAT_4BIT}"]
    lines += ["", "## Per-layer reconstruction error", "",
              "Relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), H = XᵀX of the calibration inputs (its diagonal for "
              "layer-wise methods, the full matrix on propagated activations for sequential ones).", "",
              "| layer | weight rel. err | output rel. err |", "|---|---|---|"]
    for name, e in layer_errors.items():
        out_err = f"{e['output_rel_err']:.3e}" if "output_rel_err" in e else "n/a"
        lines.append(f"| {name} | {e['weight_rel_err']:.3e} | {out_err} |")
    return "\n".join(lines) + "\n"
