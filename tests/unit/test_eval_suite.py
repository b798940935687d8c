"""KL / agreement, cloze tasks (construction, JSONL determinism, lm-eval-style scoring) and speed."""
from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from squeezeflow.calibration import eval_windows, load_text, tokenize
from squeezeflow.evaluation.cloze import (_encode_pair, _loglikelihoods, build_last_word_task,
                                          build_next_sentence_task, cloze_suite, load_jsonl, score_last_word,
                                          score_multiple_choice, split_sentences, write_jsonl)
from squeezeflow.evaluation.kl import kl_and_agreement
from squeezeflow.evaluation.speed import measure_speed, speed_ratios
from squeezeflow.models import load_model, load_tokenizer

VOCAB = 49152


@pytest.fixture(scope="module")
def text() -> str:
    return load_text("sotu-2000-2021").text[:20000]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def net(tiny_model: Path):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def windows(text: str, tokenizer) -> torch.Tensor:
    return eval_windows(tokenize(text, tokenizer), 32, max_windows=2)


class OracleLM(torch.nn.Module):
    """A fake causal LM that knows some token sequences: wherever the input so far is a prefix of one,
    it puts a logit of 30 on that sequence's next token (log-prob ~0), and 0 on everything else."""

    def __init__(self, sequences: list[list[int]]) -> None:
        super().__init__()
        self.sequences = [torch.tensor(s) for s in sequences]

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        b_size, length = input_ids.shape
        logits = torch.zeros(b_size, length, VOCAB)
        for b in range(b_size):
            for seq in self.sequences:
                n = min(length, len(seq))
                matched = int((input_ids[b, :n] == seq[:n]).long().cumprod(0).sum())
                for t in range(min(matched, len(seq) - 1)):
                    logits[b, t, seq[t + 1]] = 30.0
        return SimpleNamespace(logits=logits)


class UniformLM(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def _ids(tokenizer, s: str) -> list[int]:
    return tokenizer(s, add_special_tokens=False)["input_ids"]


# --- KL -------------------------------------------------------------------------------------------
def test_kl_of_a_model_against_its_own_copy_is_zero(net, tiny_model: Path, windows: torch.Tensor):
    other = load_model(tiny_model)  # a separate load, not the same object
    r = kl_and_agreement(other, net, windows)
    assert abs(r["kl"]) < 1e-9
    assert r["top1_agreement"] == 1.0
    assert r["positions"] == windows.shape[0] * (windows.shape[1] - 1)


def test_kl_of_a_perturbed_copy_matches_a_direct_reference(net, windows: torch.Tensor):
    noisy = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = noisy.model.layers[0].mlp.down_proj.weight
        w.add_(torch.randn(w.shape, generator=g) * 0.5)
    r = kl_and_agreement(noisy, net, windows, batch_size=2)
    assert r["kl"] > 1e-6 and 0.0 <= r["top1_agreement"] <= 1.0
    # Reference: all logits at once, torch's kl_div(input=log Q, target=log P) = Σ P (log P − log Q).
    with torch.no_grad():
        log_p = torch.log_softmax(net(input_ids=windows).logits[:, :-1].double(), -1).reshape(-1, VOCAB)
        log_q = torch.log_softmax(noisy(input_ids=windows).logits[:, :-1].double(), -1).reshape(-1, VOCAB)
    forward = float(F.kl_div(log_q, log_p, log_target=True, reduction="sum")) / log_p.shape[0]
    assert r["kl"] == pytest.approx(forward, rel=1e-9)
    assert r["top1_agreement"] == pytest.approx(float((log_p.argmax(-1) == log_q.argmax(-1)).double().mean()))
    # Batching changes nothing but memory.
    assert kl_and_agreement(noisy, net, windows, batch_size=1)["kl"] == pytest.approx(r["kl"], rel=1e-9)


class ConstantLM(torch.nn.Module):
    """Every position gets the same logits: a known distribution for checking the KL direction."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, VOCAB).clone())


def test_kl_direction_is_base_as_reference():
    # P peaked on token 0, Q uniform: KL(P‖Q) ≈ 7.76 nats and KL(Q‖P) ≈ 1.46 in closed form, so a
    # swapped direction fails.
    peaked = torch.zeros(VOCAB)
    peaked[0] = 12.0
    e12 = torch.exp(torch.tensor(12.0, dtype=torch.float64))
    p0, pr = e12 / (e12 + VOCAB - 1), 1 / (e12 + VOCAB - 1)
    kl_pq = float(p0 * torch.log(p0 * VOCAB) + (VOCAB - 1) * pr * torch.log(pr * VOCAB))
    kl_qp = float(torch.log(1 / (VOCAB * p0)) / VOCAB + (VOCAB - 1) / VOCAB * torch.log(1 / (VOCAB * pr)))
    ids = torch.zeros(2, 5, dtype=torch.long)
    r = kl_and_agreement(ConstantLM(torch.zeros(VOCAB)), ConstantLM(peaked), ids)
    assert r["kl"] == pytest.approx(kl_pq, rel=1e-6) and abs(kl_pq - kl_qp) > 1.0
    assert r["positions"] == 8 and r["top1_agreement"] == 1.0  # uniform argmax ties resolve to token 0
    swapped = kl_and_agreement(ConstantLM(peaked), ConstantLM(torch.zeros(VOCAB)), ids)
    assert swapped["kl"] == pytest.approx(kl_qp, rel=1e-6)


# --- task construction ----------------------------------------------------------------------------
def test_sentence_splitter_keeps_abbreviations_and_cuts_at_stage_directions():
    t = ('Mr. Smith went to the U.S. Congress. He spoke! Did he? "Yes." [Applause] Thank you, Mrs. Jones, '
         'see you at 5 p.m. tomorrow. Today.\n\nA new address.')
    assert [t[s.start:s.end] for s in split_sentences(t)] == [
        "Mr. Smith went to the U.S. Congress.", "He spoke!", "Did he?", '"Yes."',
        "Thank you, Mrs. Jones, see you at 5 p.m. tomorrow.", "Today.", "A new address."]
    blocks = [s.block for s in split_sentences(t)]
    assert blocks[3] != blocks[4] != blocks[6]  # "[Applause]" and blank lines separate blocks


def test_cloze_jsonl_is_byte_identical_for_a_seed_and_differs_across_seeds(text: str, tmp_path: Path):
    for build in (build_next_sentence_task, build_last_word_task):
        a = write_jsonl(build(text, 12, seed=3), tmp_path / "a.jsonl")
        b = write_jsonl(build(text, 12, seed=3), tmp_path / "b.jsonl")
        c = write_jsonl(build(text, 12, seed=4), tmp_path / "c.jsonl")
        assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
        assert a == b == hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
        assert c != a
        assert load_jsonl(tmp_path / "a.jsonl") == build(text, 12, seed=3)


def test_next_sentence_items_are_well_formed(text: str):
    items = build_next_sentence_task(text, 20, seed=0)
    assert len(items) == 20 and len({it["id"] for it in items}) == 20
    for it in items:
        assert set(it) == {"id", "context", "choices", "label"}
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert 0 <= it["label"] < 4
        # The true sentence is what follows the context in the text; no distractor does.
        follows = re.compile(re.escape(it["context"]) + r"\s+" + re.escape(it["choices"][it["label"]]))
        assert follows.search(text)
        for j, c in enumerate(it["choices"]):
            assert c in text
            if j != it["label"]:
                assert c not in it["context"]
                answer_words = len(it["choices"][it["label"]].split())
                assert abs(len(c.split()) - answer_words) <= max(2, round(0.5 * answer_words))  # length-matched
                assert not re.search(re.escape(it["context"]) + r"\s+" + re.escape(c), text)
    assert len({it["label"] for it in items}) > 1  # the answer position is shuffled


def test_last_word_items_are_well_formed(text: str):
    items = build_last_word_task(text, 20, seed=0)
    assert len(items) == 20
    for it in items:
        assert set(it) == {"id", "context", "target"}
        assert re.fullmatch(r"[A-Za-z][A-Za-z'’-]*[A-Za-z]", it["target"]) and len(it["target"]) >= 3
        at = text.find(it["context"] + " " + it["target"])
        assert at >= 0
        after = text[at + len(it["context"]) + 1 + len(it["target"]):]
        assert re.match(r"[\"'”’)]*[.!?]", after) or re.match(r"[.!?]", after)  # ends at a sentence end
        assert 40 <= len((it["context"] + " " + it["target"]).split()) <= 80


# --- scoring --------------------------------------------------------------------------------------
def test_scores_of_the_tiny_model_are_accuracies_over_all_items(net, tokenizer, text: str):
    mc = score_multiple_choice(net, tokenizer, build_next_sentence_task(text, 4, seed=0))
    lw = score_last_word(net, tokenizer, build_last_word_task(text, 4, seed=0), batch_size=2)
    assert mc["n"] == 4 and 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0
    assert lw["n"] == 4 and 0.0 <= lw["acc"] <= 1.0


class FullLogits(torch.nn.Module):
    """Wraps a model and ignores logits_to_keep: every position comes back, as from a plain model."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        return self.inner(input_ids=input_ids, use_cache=False)


def test_loglikelihoods_agree_with_and_without_logits_to_keep(net, tokenizer, text: str):
    # Rows of different lengths in one batch: the kept-positions offset must line up for each row.
    items = build_last_word_task(text, 3, seed=1)
    requests = [_encode_pair(tokenizer, it["context"], " " + it["target"]) for it in items]
    requests.append(_encode_pair(tokenizer, "Short context", " and a somewhat longer continuation here"))
    kept = _loglikelihoods(net, requests, batch_size=4)
    full = _loglikelihoods(FullLogits(net), requests, batch_size=4)
    for (ll_k, greedy_k), (ll_f, greedy_f) in zip(kept, full):
        assert ll_k == pytest.approx(ll_f, rel=1e-5) and greedy_k == greedy_f
    # And against a one-request hand computation of the last request.
    ctx, cont = requests[-1]
    with torch.no_grad():
        logp = torch.log_softmax(net(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
    hand = sum(float(logp[len(ctx) - 1 + k, tok]) for k, tok in enumerate(cont))
    assert kept[-1][0] == pytest.approx(hand, rel=1e-5)


def test_multiple_choice_scoring_picks_the_choice_the_model_predicts(tokenizer, text: str):
    items = build_next_sentence_task(text, 4, seed=0)
    right = OracleLM([_ids(tokenizer, it["context"] + " " + it["choices"][it["label"]]) for it in items])
    assert score_multiple_choice(right, tokenizer, items) == {"acc": 1.0, "acc_norm": 1.0, "n": 4}
    wrong = OracleLM([_ids(tokenizer, it["context"] + " " + it["choices"][(it["label"] + 1) % 4]) for it in items])
    assert score_multiple_choice(wrong, tokenizer, items) == {"acc": 0.0, "acc_norm": 0.0, "n": 4}


def test_acc_norm_divides_by_choice_length(tokenizer):
    # Under a uniform model a choice's log-likelihood is -n_tokens·log V: raw acc prefers the fewest
    # tokens ("x"), acc_norm the fewest tokens per character ("the the the the").
    item = {"id": "t", "context": "The answer is", "choices": ["x", "the the the the"], "label": 1}
    assert len(_ids(tokenizer, "The answer is x")) - len(_ids(tokenizer, "The answer is")) == 1
    assert len(_ids(tokenizer, "The answer is the the the the")) - len(_ids(tokenizer, "The answer is")) == 4
    assert score_multiple_choice(UniformLM(), tokenizer, [item]) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_last_word_scoring_needs_every_target_token_greedy(tokenizer, text: str):
    items = build_last_word_task(text, 5, seed=0)
    right = OracleLM([_ids(tokenizer, it["context"] + " " + it["target"]) for it in items])
    assert score_last_word(right, tokenizer, items, batch_size=2) == {"acc": 1.0, "n": 5}
    wrong = OracleLM([_ids(tokenizer, it["context"] + " zebra") for it in items])
    assert score_last_word(wrong, tokenizer, items, batch_size=2) == {"acc": 0.0, "n": 5}
    # Only the first token of a multi-token target right is not enough.
    multi = [it for it in items if len(_ids(tokenizer, " " + it["target"])) > 1]
    if multi:
        it = multi[0]
        first = _ids(tokenizer, it["context"] + " " + it["target"])[:-1] + [_ids(tokenizer, " zebra")[0]]
        assert score_last_word(OracleLM([first]), tokenizer, [it])["acc"] == 0.0


def test_cloze_suite_writes_files_and_stamps_protocol(net, tokenizer, text: str, tmp_path: Path):
    sha = hashlib.sha256(text.encode()).hexdigest()
    r = cloze_suite(net, tokenizer, text, sha, n_items=3, seed=7, out_dir=tmp_path)
    assert set(r) == {"next_sentence", "last_word"}
    for name, res in r.items():
        path = tmp_path / f"{name}.jsonl"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == res["file_sha256"]
        assert len(load_jsonl(path)) == res["n"] == 3
        assert res["seed"] == 7 and res["corpus_sha256"] == sha and res["n_items"] == 3
        assert 0.0 <= res["acc"] <= 1.0
    assert "acc_norm" in r["next_sentence"] and r["next_sentence"]["chance"] == 0.25


# --- speed ----------------------------------------------------------------------------------------
def test_speed_reports_positive_rates_and_ratios(net, tiny_model: Path):
    s = measure_speed(net, prompt_len=16, new_tokens=4, repeats=2, warmup=1)
    assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0
    assert s["settings"]["prompt_len"] == 16 and s["settings"]["threads"] == torch.get_num_threads()
    r = speed_ratios(load_model(tiny_model), net, prompt_len=16, new_tokens=4, repeats=2, warmup=1)
    for side in ("base", "model"):
        assert r[side]["prefill_tokens_per_s"] > 0 and r[side]["decode_tokens_per_s"] > 0
    assert r["decode_ratio"] == pytest.approx(r["model"]["decode_tokens_per_s"] / r["base"]["decode_tokens_per_s"])
    assert r["prefill_ratio"] > 0
