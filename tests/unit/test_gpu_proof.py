"""benchmarks/gpu_proof.py, the one command a session with a GPU runs, works end to end: here on CPU with tiny
shapes (--quick), so it does not rot between the rare sessions that have a device."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_proof_runs_every_section_on_cpu(tmp_path, smollm_path):
    p = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "gpu_proof.py"), "--quick", "--device", "cpu",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    sections = json.loads((tmp_path / "gpu_proof.json").read_text())["sections"]
    assert set(sections) == {"xtx", "gptq", "pipeline", "kernels", "decode"}
    xtx = {r["dtype"]: r for r in sections["xtx"]["result"]}
    assert xtx["fp64"]["rel_error_vs_fp64"] == 0 < xtx["fp32"]["rel_error_vs_fp64"] < xtx["bf16"]["rel_error_vs_fp64"]
    assert sections["gptq"]["result"]["tiny_q_proj_parity"]["codes_equal_fraction"] == 1.0
    assert set(sections["gptq"]["result"]["tiny"]["per_linear_s"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"}
    for recipe in ("rtn-w4g64", "gptq-w4g64"):
        assert sections["pipeline"]["result"][recipe]["cpu"]["perplexity"]
    assert sections["kernels"]["result"]["returncode"] == 0 and sections["kernels"]["result"]["table"]
    assert sections["decode"]["result"]["w4g64-triton"]["decode_tok_s"] > 0
