"""`squeezeflow recipes [--json]` lists every preset with method, bits, statistics and a description; the
parser (`squeezeflow --help`) imports neither torch nor transformers nor prefect, and importing squeezeflow
still registers its quantizer with transformers once transformers is imported."""
import json
import subprocess
import sys

from squeezeflow.cli import main
from squeezeflow.methods.registry import registrations
from squeezeflow.recipes import PRESET_EXAMPLES


def test_recipes_json_lists_every_preset(capsys):
    assert main(["--json", "recipes"]) == 0
    cat = json.loads(capsys.readouterr().out)
    presets = {p["name"]: p for p in cat["presets"]}
    assert list(presets) == list(PRESET_EXAMPLES)
    assert all(p["description"] and p["method"] and isinstance(p["statistics"], list) for p in presets.values())
    assert (presets["rtn-w4g64"]["bits"], presets["rtn-w4g64"]["statistics"]) == (4, [])
    assert (presets["gptq-w3g64"]["bits"], presets["gptq-w3g64"]["schedule"]) == (3, "sequential")
    assert presets["gptq-w3g64"]["statistics"] == ["xtx"]
    assert presets["nowag-p50"]["bits"] is None and presets["nowag-p50"]["statistics"] == ["hdiag"]
    assert presets["rf8"]["bits"] == 8 and presets["rtn-w4g64-eg"]["bits"] == 4
    assert presets["quad-w4a4"]["statistics"] == ["residual_cov (dense model)", "xtx"]
    assert presets["trsp-25+gwq-w4g64"]["method"] == "trsp+gwq"
    assert presets["rtn-w4g64"]["description"].startswith("Round-to-nearest")
    families = {f["method"]: f for f in cat["families"]}
    assert set(families) == set(registrations())
    assert families["rtn"]["pattern"].startswith("`rtn-w<bits>")


def test_recipes_table_names_every_preset(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["preset", "method", "bits", "needs"]
    for name in PRESET_EXAMPLES:
        assert any(line.split()[0] == name for line in lines[1:] if line.strip()), name


PARSER_ONLY = """
import sys
import squeezeflow.cli
help_text = squeezeflow.cli.build_parser().format_help()
heavy = sorted(m for m in ("torch", "transformers", "prefect", "lm_eval") if m in sys.modules)
assert not heavy, heavy
assert "recipes" in help_text
"""


def test_parser_imports_nothing_heavy():
    # Not timed (the machine may be busy): what makes `--help` slow is importing torch & co, so that is checked.
    proc = subprocess.run([sys.executable, "-c", PARSER_ONLY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


REGISTERS_LATER = """
import sys
import squeezeflow
assert "transformers" not in sys.modules
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING
assert "squeezeflow" in AUTO_QUANTIZER_MAPPING and "squeezeflow" in AUTO_QUANTIZATION_CONFIG_MAPPING
"""


def test_import_squeezeflow_then_transformers_registers_the_quantizer():
    proc = subprocess.run([sys.executable, "-c", REGISTERS_LATER], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
