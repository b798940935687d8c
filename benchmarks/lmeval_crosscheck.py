#!/usr/bin/env python
"""Cross-check Squeezeflow's cloze scoring against lm-evaluation-harness on the same JSONL items.

    .venv/bin/python benchmarks/lmeval_crosscheck.py [--items 40] [--seed 0] [--model DIR]

Run from the project's .venv. lm-eval is not a project dependency: it lives in its own venv at
$SQUEEZEFLOW_CACHE/venvs/lm-eval (default ~/.cache/squeezeflow/venvs/lm-eval), created here when
missing (CPU torch==2.13.0 first, then lm_eval[hf]==0.4.13; pip picks transformers). If that install
fails the script prints pip's error and exits 1.

Steps: build both cloze tasks (next_sentence, last_word) with squeezeflow's own builders from the
held-out split, write the canonical JSONL and two local lm-eval task YAMLs; run the `lm_eval` CLI
(hf model, fp32, CPU, batch size 1, --log_samples) in the peer venv; encode every request with
lm-eval's own HFLM._encode_pair in the peer venv (token ids, BOS handling); score the same items with
squeezeflow.evaluation.cloze on the same model; compare aggregate metrics, per-item 0/1 results,
per-request log-likelihoods, the request strings lm-eval logged and the token ids.
Writes benchmarks/results/lmeval.json and lmeval.md (override with --out). Exit status: 0 when both
agree (metrics, per-item results, request strings, token ids, |Δ loglik| <= 1e-3), 3 when the report
lists a problem, 1 when lm-eval cannot be installed or run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LM_EVAL_SPEC = "lm_eval[hf]==0.4.13"   # the [hf] extra brings transformers/accelerate/peft for --model hf
TORCH_SPEC = "torch==2.13.0"          # CPU wheel, as in the Makefile
READY = ".squeezeflow-ready"
TASK_PREFIX = "sqf_"
LL_TOL = 1e-3

NEXT_SENTENCE_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
# LAMBADA convention (lm_eval/tasks/lambada/lambada_openai.yaml): the space before the word belongs to
# doc_to_target, and a loglikelihood task's request is (doc_to_text, doc_to_target) verbatim
# (target_delimiter only applies to multiple_choice); acc = is_greedy.
LAST_WORD_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: context
doc_to_target: "{{{{' ' + target}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# Runs in the peer venv: lm-eval's own request encoding (BOS policy, trailing-space move, seam).
PEER_PROBE = r'''
import json, sys
from importlib import metadata
from lm_eval.models.huggingface import HFLM
spec = json.load(open(sys.argv[1]))
lm = HFLM(pretrained=spec["model"], dtype="float32", device="cpu", batch_size=1)
tok = lm.tokenizer
probe = "The"
out = {
    "versions": {p: metadata.version(p) for p in ("lm_eval", "torch", "transformers", "tokenizers", "datasets")},
    "python": sys.version.split()[0],
    "max_length": lm.max_length,
    "add_bos_token": lm.add_bos_token,
    "prefix_token_id": lm.prefix_token_id,
    "bos_token": tok.bos_token,
    "tokenizer_default_ids": tok.encode(probe),
    "tokenizer_plain_ids": tok.encode(probe, add_special_tokens=False),
    "encoded": [list(map(list, lm._encode_pair(c, x))) for c, x in spec["requests"]],
}
json.dump(out, open(sys.argv[2], "w"))
'''


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The peer venv
# --------------------------------------------------------------------------------------------------
def peer_venv_dir() -> Path:
    from squeezeflow.settings import cache_home

    return cache_home() / "venvs" / "lm-eval"


def _pip(py: Path, spec: str) -> None:
    log(f"[venv] pip install {spec}")
    proc = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", spec],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = proc.stdout.splitlines()
        errors = [ln for ln in lines if "ERROR" in ln or "error:" in ln.lower()] or lines[-25:]
        print(f"lm-eval venv: `pip install {spec}` failed (exit {proc.returncode}):\n  " + "\n  ".join(errors),
              file=sys.stderr)
        sys.exit(1)


def ensure_peer_venv(venv: Path) -> Path:
    """The lm-eval venv's python; built (torch first, then lm_eval) when missing or incomplete."""
    py = venv / "bin" / "python"
    if (venv / READY).is_file() and py.exists():
        check = subprocess.run([str(py), "-c", "import lm_eval, transformers, torch"], capture_output=True, text=True)
        if check.returncode == 0:
            return py
        log(f"[venv] {venv} is broken ({check.stderr.strip().splitlines()[-1:]}); rebuilding")
    if venv.exists():
        log(f"[venv] removing incomplete {venv}")
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"[venv] creating {venv}")
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        print(f"lm-eval venv: `python -m venv {venv}` failed: {made.stderr.strip()}", file=sys.stderr)
        sys.exit(1)
    t0 = time.time()
    _pip(py, TORCH_SPEC)
    _pip(py, LM_EVAL_SPEC)
    check = subprocess.run([str(py), "-c", "import lm_eval, transformers, torch, accelerate"], capture_output=True,
                           text=True)
    if check.returncode != 0:
        print(f"lm-eval venv: installed, but `import lm_eval` fails:\n{check.stderr.strip()}", file=sys.stderr)
        sys.exit(1)
    (venv / READY).write_text(json.dumps({"specs": [TORCH_SPEC, LM_EVAL_SPEC], "install_s": round(time.time() - t0, 1),
                                          "versions": peer_versions(py)}, indent=1) + "\n")
    log(f"[venv] ready in {time.time() - t0:.0f} s")
    return py


def peer_versions(py: Path) -> dict:
    code = ("import json, sys; from importlib import metadata as m; print(json.dumps({**{p: m.version(p) for p in "
            "('lm_eval', 'torch', 'transformers', 'tokenizers', 'datasets', 'accelerate')}, "
            "'python': sys.version.split()[0]}))")
    return json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)


def own_versions() -> dict:
    out = {}
    for p in ("torch", "transformers", "tokenizers", "lm_eval"):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out | {"python": platform.python_version()}


# --------------------------------------------------------------------------------------------------
# Items, task YAMLs, the lm-eval run
# --------------------------------------------------------------------------------------------------
def requests_for(task: str, item: dict) -> list[tuple[str, str]]:
    """The (context, continuation) pairs both scorers should evaluate for one item."""
    if task == "next_sentence":
        return [(item["context"], " " + c) for c in item["choices"]]
    return [(item["context"], " " + item["target"])]


def run_lm_eval(peer_py: Path, model_dir: Path, work: Path, tasks: list[str]) -> tuple[dict, dict, float, list[str]]:
    out_dir = work / "lm_eval_out"
    cmd = [str(peer_py.parent / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", ",".join(TASK_PREFIX + t for t in tasks), "--include_path", str(work / "tasks"),
           "--device", "cpu", "--batch_size", "1", "--output_path", str(out_dir), "--log_samples"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(work / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false"}
    log("[lm-eval] " + " ".join(cmd))
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - t0
    (work / "lm_eval.log").write_text(proc.stdout)
    if proc.returncode != 0:
        print(f"lm_eval failed (exit {proc.returncode}); last lines:\n" + "\n".join(proc.stdout.splitlines()[-40:]),
              file=sys.stderr)
        sys.exit(1)
    results_files = sorted(out_dir.rglob("results_*.json"))
    if not results_files:
        sys.exit(f"lm_eval wrote no results_*.json under {out_dir}")
    results = json.loads(results_files[-1].read_text())
    samples = {}
    for t in tasks:
        files = sorted(out_dir.rglob(f"samples_{TASK_PREFIX}{t}_*.jsonl"))
        if not files:
            sys.exit(f"lm_eval wrote no samples for {TASK_PREFIX}{t} under {out_dir}")
        samples[t] = sorted((json.loads(ln) for ln in files[-1].read_text().splitlines() if ln.strip()),
                            key=lambda s: s["doc_id"])
    return results, samples, wall, cmd


def _ll_greedy(resp) -> tuple[float, bool]:
    """One logged loglikelihood response: [ll, is_greedy], possibly nested one level, possibly strings."""
    while isinstance(resp, list) and len(resp) == 1 and isinstance(resp[0], list):
        resp = resp[0]
    ll, greedy = resp[0], resp[1]
    return float(ll), greedy in (True, "True", "true", 1)


def _logged_requests(sample: dict) -> list[tuple[str, str]]:
    """(context, continuation) per request as lm-eval logged them: {"gen_args_i": {"arg_0", "arg_1"}}
    in 0.4.13; older releases logged a list of [context, continuation] pairs."""
    args = sample["arguments"]
    if isinstance(args, dict):
        args = [args[k] for k in sorted(args, key=lambda k: int(k.rsplit("_", 1)[1]))]
    return [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else (a[0], a[1]) for a in args]


# --------------------------------------------------------------------------------------------------
# Our side
# --------------------------------------------------------------------------------------------------
def score_ours(model, tokenizer, task: str, items: list[dict]) -> tuple[dict, list[dict]]:
    """The public scorer's aggregate, plus per-request detail recorded from the same call: the module's
    _encode_pair/_loglikelihoods are wrapped (not changed) for the duration, so nothing is scored twice."""
    from squeezeflow.evaluation import cloze

    encoded, scored = [], []
    real_encode, real_ll = cloze._encode_pair, cloze._loglikelihoods

    def encode(tok, context, continuation):
        ctx, cont = real_encode(tok, context, continuation)
        encoded.append((ctx, cont))
        return ctx, cont

    def loglikelihoods(m, requests, batch_size):
        out = real_ll(m, requests, batch_size)
        scored.extend(out)
        return out

    cloze._encode_pair, cloze._loglikelihoods = encode, loglikelihoods
    try:
        scorer = cloze.score_multiple_choice if task == "next_sentence" else cloze.score_last_word
        agg = scorer(model, tokenizer, items)
    finally:
        cloze._encode_pair, cloze._loglikelihoods = real_encode, real_ll
    n_req = sum(len(requests_for(task, item)) for item in items)
    assert len(encoded) == len(scored) == n_req, (len(encoded), len(scored), n_req)
    per, k = [], 0
    for item in items:
        n = len(requests_for(task, item))
        lls, greedy, tokens = [ll for ll, _ in scored[k:k + n]], [g for _, g in scored[k:k + n]], encoded[k:k + n]
        k += n
        if task == "next_sentence":
            norm = [ll / len(c) for ll, c in zip(lls, item["choices"])]
            per.append({"lls": lls, "tokens": tokens, "acc": int(lls.index(max(lls)) == item["label"]),
                        "acc_norm": int(norm.index(max(norm)) == item["label"])})
        else:
            per.append({"lls": lls, "tokens": tokens, "acc": int(greedy[0])})
    return agg, per


def fp32_check(model, worst) -> dict:
    """Re-score the request with the largest |Δ loglik| the way HFLM._loglikelihood_tokens does (full
    logits, float32 log_softmax, batch 1). squeezeflow's scorer takes log_softmax in float64, so the
    residual against lm-eval should vanish here if that is its only source."""
    import torch

    delta, item_id, j, (ctx, cont), ours_ll, lm_ll = worst
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([(ctx + cont)[:-1]]), use_cache=False).logits[0, -len(cont):]
        ll32 = float(torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(cont)[:, None]).sum())
    return {"id": item_id, "request": j, "continuation_tokens": len(cont), "squeezeflow_ll": ours_ll,
            "lm_eval_ll": lm_ll, "abs_delta": delta, "fp32_log_softmax_ll": ll32, "fp32_abs_delta": abs(ll32 - lm_ll)}


# --------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=40, help="items per task (default 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="sotu-2000-2021", help="held-out text the items are built from")
    ap.add_argument("--model", default="smollm2-135m", help="prepared short name or a dense HF safetensors dir")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where lmeval.json/.md go")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (JSONL, YAMLs, lm-eval output)")
    args = ap.parse_args()
    t_start = time.time()

    peer_py = ensure_peer_venv(peer_venv_dir())

    from squeezeflow.calibration import load_text
    from squeezeflow.evaluation import cloze
    from squeezeflow.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(args.model)
    model_dir = Path(resolved.path).resolve()
    text = load_text(args.split)
    tasks = {"next_sentence": cloze.build_next_sentence_task(text.text, args.items, args.seed),
             "last_word": cloze.build_last_word_task(text.text, args.items, args.seed)}

    work = Path(tempfile.mkdtemp(prefix="sqf-lmeval-"))
    try:
        (work / "tasks").mkdir()
        shas, yamls = {}, {}
        for name, items in tasks.items():
            data = work / "data" / f"{name}.jsonl"
            shas[name] = cloze.write_jsonl(items, data)
            template = NEXT_SENTENCE_YAML if name == "next_sentence" else LAST_WORD_YAML
            yamls[name] = template.format(task=TASK_PREFIX + name, data=json.dumps(str(data)))
            (work / "tasks" / f"{TASK_PREFIX}{name}.yaml").write_text(yamls[name])

        # lm-eval's own encoding of every request (peer venv).
        all_reqs = [r for name, items in tasks.items() for item in items for r in requests_for(name, item)]
        (work / "probe_in.json").write_text(json.dumps({"model": str(model_dir), "requests": all_reqs}))
        (work / "probe.py").write_text(PEER_PROBE)
        log("[lm-eval] encoding requests with HFLM._encode_pair")
        probe = subprocess.run([str(peer_py), str(work / "probe.py"), str(work / "probe_in.json"),
                                str(work / "probe_out.json")], capture_output=True, text=True,
                               env=os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        if probe.returncode != 0:
            sys.exit("peer encoding probe failed:\n" + probe.stderr[-3000:])
        peer = json.loads((work / "probe_out.json").read_text())

        lm_results, samples, lm_wall, cmd = run_lm_eval(peer_py, model_dir, work, list(tasks))

        log("[squeezeflow] scoring the same items")
        t0 = time.time()
        model = load_model(model_dir)
        model.eval()
        tokenizer = load_tokenizer(model_dir)
        ours = {name: score_ours(model, tokenizer, name, items) for name, items in tasks.items()}
        our_wall = time.time() - t0
    finally:
        if args.keep:
            log(f"[work] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    # ---- compare -------------------------------------------------------------------------------
    rows, per_task, problems = [], {}, []
    k = 0   # index into peer["encoded"], same order as all_reqs
    for name, items in tasks.items():
        agg, per = ours[name]
        smp = samples[name]
        if len(smp) != len(items):
            problems.append(f"{name}: lm-eval logged {len(smp)} samples for {len(items)} items")
        metrics = ["acc", "acc_norm"] if name == "next_sentence" else ["acc"]
        max_d, arg_mismatch, tok_mismatch, details, worst = 0.0, 0, 0, [], None
        disagree = {m: [] for m in metrics}
        for item, mine, s in zip(items, per, smp):
            if s["doc"].get("id") != item["id"]:
                problems.append(f"{name}: sample {s['doc_id']} is {s['doc'].get('id')}, expected {item['id']}")
            theirs = [_ll_greedy(r) for r in s["filtered_resps"]] if name == "next_sentence" \
                else [_ll_greedy(s["filtered_resps"])]
            if _logged_requests(s) != requests_for(name, item):
                arg_mismatch += 1
            for (oc, ox) in mine["tokens"]:
                pc, px = peer["encoded"][k]
                tok_mismatch += int((oc, ox) != (pc, px))
                k += 1
            deltas = [abs(a - b) for a, (b, _) in zip(mine["lls"], theirs)]
            for j, dlt in enumerate(deltas):
                if worst is None or dlt > worst[0]:
                    worst = (dlt, item["id"], j, mine["tokens"][j], mine["lls"][j], theirs[j][0])
            max_d = max(max_d, *deltas)
            row = {"id": item["id"], "ours_ll": [round(v, 6) for v in mine["lls"]],
                   "lm_eval_ll": [round(v, 6) for v, _ in theirs], "max_abs_dll": float(f"{max(deltas):.3g}")}
            for m in metrics:
                a, b = mine[m], int(float(s[m]))
                row[m] = {"squeezeflow": a, "lm_eval": b}
                if a != b:
                    disagree[m].append(item["id"])
            details.append(row)
        for m in metrics:
            lm_val = lm_results["results"][TASK_PREFIX + name][f"{m},none"]
            per_item_mean = sum(p[m] for p in per) / len(per)
            if abs(per_item_mean - agg[m]) > 1e-12:
                problems.append(f"{name}/{m}: public scorer {agg[m]} != per-item recomputation {per_item_mean}")
            rows.append({"task": name, "metric": m, "squeezeflow": agg[m], "lm_eval": lm_val, "items": len(items),
                         "disagreements": len(disagree[m]), "max_abs_dloglik": max_d})
        if arg_mismatch:
            problems.append(f"{name}: {arg_mismatch} items whose logged lm-eval request strings differ from ours")
        if tok_mismatch:
            problems.append(f"{name}: {tok_mismatch} requests whose token ids differ from lm-eval's _encode_pair")
        if max_d > LL_TOL:
            problems.append(f"{name}: max |Δ loglik| {max_d:.3g} > {LL_TOL}")
        for m in metrics:
            if disagree[m]:
                problems.append(f"{name}/{m}: items disagree: {', '.join(disagree[m])}")
        per_task[name] = {"worst_request": fp32_check(model, worst), "jsonl_sha256": shas[name],
                          "task_yaml": yamls[name], "request_strings_mismatch": arg_mismatch,
                          "token_ids_mismatch": tok_mismatch, "requests": sum(len(p["lls"]) for p in per),
                          "disagreeing_items": disagree, "items": details}
    for r in rows:
        if abs(r["squeezeflow"] - r["lm_eval"]) > 1e-12:
            problems.append(f"{r['task']}/{r['metric']}: squeezeflow {r['squeezeflow']} vs lm-eval {r['lm_eval']}")
    bos = {k2: peer[k2] for k2 in ("add_bos_token", "prefix_token_id", "bos_token", "tokenizer_default_ids",
                                   "tokenizer_plain_ids", "max_length")}
    bos["lm_eval_adds_bos"] = peer["tokenizer_default_ids"] != peer["tokenizer_plain_ids"]
    agree = not problems

    report = {
        "agree": agree,
        "problems": problems,
        "table": rows,
        "config": {"items": args.items, "seed": args.seed, "split": args.split, "corpus_sha256": text.sha256,
                   "model": args.model, "model_dir": str(model_dir), "model_fingerprint": resolved.fingerprint,
                   "ll_tolerance": LL_TOL, "lm_eval_command": " ".join(["lm_eval", *cmd[1:]]),
                   "peer_venv": str(peer_venv_dir())},
        "versions": {"squeezeflow_venv": own_versions(), "lm_eval_venv": peer_versions(peer_py)},
        "jsonl_sha256": shas,
        "lm_eval_tokenization": bos,
        "lm_eval_config_n_samples": lm_results.get("n-samples"),
        "wall_s": {"lm_eval_cli": round(lm_wall, 1), "squeezeflow_scoring": round(our_wall, 1),
                   "total": round(time.time() - t_start, 1)},
        "tasks": per_task,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lmeval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    md = render_md(report)
    (args.out / "lmeval.md").write_text(md)
    print(md)
    return 0 if agree else 3


def _table(rows: list[dict]) -> str:
    lines = ["| task | metric | squeezeflow | lm-eval | items | disagreements | max \\|Δ loglik\\| |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['squeezeflow']:.4f} | {r['lm_eval']:.4f} | {r['items']} | "
                     f"{r['disagreements']} | {r['max_abs_dloglik']:.2e} |")
    return "\n".join(lines)


def _worst_line(task: str, w: dict) -> str:
    which = f"{w['id']} choice {w['request']}" if task == "next_sentence" else w["id"]
    share = "all" if w["fp32_abs_delta"] < 1e-5 else "only part"
    return (f"- Largest |Δ loglik| in {task}: {which} ({w['continuation_tokens']} continuation token(s)), squeezeflow "
            f"{w['squeezeflow_ll']:.6f} vs lm-eval {w['lm_eval_ll']:.6f}. The same logits through a float32 "
            f"log_softmax, as HFLM does, give {w['fp32_log_softmax_ll']:.6f} (|Δ| {w['fp32_abs_delta']:.1e}): "
            f"squeezeflow's float64 log_softmax accounts for {share} of the difference.")


def render_md(rep: dict) -> str:
    c, v = rep["config"], rep["versions"]
    tok = rep["lm_eval_tokenization"]
    lines = [
        "# Cloze cross-check: squeezeflow vs lm-evaluation-harness", "",
        f"Model `{c['model']}` (fingerprint `{c['model_fingerprint'][:16]}`), {c['items']} items per task, seed "
        f"{c['seed']}, split `{c['split']}` (corpus sha256 `{c['corpus_sha256'][:16]}`).", "",
        _table(rep["table"]), "",
        f"**Verdict: {'agree' if rep['agree'] else 'DISAGREE'}.** "
        + ("Same accuracies, same per-item results, same request strings and token ids; "
           f"log-likelihoods within {c['ll_tolerance']}." if rep["agree"] else "Problems:"),
    ]
    lines += [f"- {p}" for p in rep["problems"]]
    lines += [
        "",
        f"- lm-eval BOS: HFLM add_bos_token={tok['add_bos_token']}, the tokenizer's default encoding "
        f"{'adds' if tok['lm_eval_adds_bos'] else 'adds no'} special token "
        f"({tok['tokenizer_default_ids']} vs {tok['tokenizer_plain_ids']} for \"The\"); squeezeflow uses no BOS.",
        *[_worst_line(t, r["worst_request"]) for t, r in rep["tasks"].items()],
        "- JSONL sha256: " + ", ".join(f"{t} `{s}`" for t, s in rep["jsonl_sha256"].items()),
        f"- squeezeflow venv: torch {v['squeezeflow_venv']['torch']}, transformers "
        f"{v['squeezeflow_venv']['transformers']}, lm_eval {v['squeezeflow_venv']['lm_eval'] or 'not installed'}",
        f"- lm-eval venv: torch {v['lm_eval_venv']['torch']}, transformers {v['lm_eval_venv']['transformers']}, "
        f"lm_eval {v['lm_eval_venv']['lm_eval']}, datasets {v['lm_eval_venv']['datasets']}",
        f"- wall time: lm_eval CLI {rep['wall_s']['lm_eval_cli']} s, squeezeflow scoring "
        f"{rep['wall_s']['squeezeflow_scoring']} s, total {rep['wall_s']['total']} s",
        "",
        "lm-eval command (task YAMLs and JSONL written to a temp dir by `benchmarks/lmeval_crosscheck.py`):",
        "", "```", c["lm_eval_command"], "```", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
