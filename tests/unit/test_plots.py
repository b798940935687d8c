"""Sweep plots are real PNGs and byte-identical for identical numbers (artifacts stay reproducible)."""
from squeezeflow.evaluation import plots
from squeezeflow.evaluation.comparison import comparison_files

METRICS = [
    {"recipe": "fp32", "bits_per_weight": 32.0, "size_bytes": 10, "perplexity": {"a": 20.0, "b": 40.0}},
    {"recipe": "rtn-w3g64", "bits_per_weight": 3.5, "size_bytes": 4, "perplexity": {"a": 60.0, "b": 150.0}},
    {"recipe": "gptq-w3g64", "bits_per_weight": 3.5, "size_bytes": 4, "perplexity": {"a": 45.0, "b": 130.0}},
]
ERRORS = {"rtn-w3g64": {"model.layers.0.mlp.up_proj": {"output_rel_err": 0.02},
                        "model.layers.1.mlp.up_proj": {"output_rel_err": 0.03}},
          "gptq-w3g64": {"model.layers.0.mlp.up_proj": {"output_rel_err": 0.01},
                         "model.layers.1.mlp.up_proj": {"output_rel_err": 0.015}}}


def test_plots_are_deterministic_pngs():
    a, b = plots.perplexity_vs_bits(METRICS), plots.perplexity_vs_bits(METRICS)
    assert a == b and a[:8] == b"\x89PNG\r\n\x1a\n" and len(a) > 5000
    c = plots.layer_errors(ERRORS)
    assert c == plots.layer_errors(ERRORS) and c[:4] == b"\x89PNG" and c != a
    changed = [dict(METRICS[0])] + [dict(METRICS[1], perplexity={"a": 70.0, "b": 150.0}), METRICS[2]]
    assert plots.perplexity_vs_bits(changed) != a


def test_comparison_files_list_every_recipe():
    files = comparison_files(METRICS)
    md = files["comparison.md"].decode()
    assert all(f"| {m['recipe']} |" in md for m in METRICS)
    csv_lines = files["comparison.csv"].decode().splitlines()
    assert csv_lines[0].startswith("recipe,bits_per_weight,size_bytes,sparsity,ppl_a,ppl_b") and len(csv_lines) == 4
