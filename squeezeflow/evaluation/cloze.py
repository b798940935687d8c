"""Zero-shot cloze tasks built from held-out text, scored by log-likelihood as lm-eval-harness does.

No packaged PIQA/HellaSwag/LAMBADA exists offline here (ENVIRONMENT.md, "Real text"), so two tasks are
built deterministically from the evaluation corpus:

- next_sentence: 2-3 consecutive sentences as context, the true next sentence among 3 distractor
  sentences of about the same length drawn from elsewhere in the text (chance 0.25). Multiple
  choice: acc compares the summed log-probability of each choice's tokens after `context + " "`;
  acc_norm divides it by the choice's length in characters, lm-eval's `completion_len = len(choice)`
  (for the ASCII-dominated corpora here that is also the byte length).
- last_word: a 40-80 word passage ending at a sentence end, minus its final word (LAMBADA-style).
  acc = the model's greedy continuation, as many tokens as `" " + target` has, equals those tokens.
  Teacher-forced argmax at every target position is exactly that, so one forward pass decides it.

Items are written as canonical JSONL whose sha256 goes into the metrics, so a number always names
the exact items behind it. The files use lm-eval's field conventions (context / choices / label;
context / target), so where `lm_eval` is installed they can also be run through a local task YAML
(doc_to_text: context, doc_to_choice: choices, doc_to_target: label). It is not a dependency: the
scorer below reproduces its loglikelihood requests (context/continuation split, no BOS, left
truncation to the model's context length).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import BadInput
from ..store import sha256_bytes

# --- sentence splitting ---------------------------------------------------------------------------
# Words ending in "." that rarely end a sentence. "etc." and "no." are left out: they often do.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "messrs", "dr", "prof", "sr", "jr", "st", "gen", "gov", "sen",
                            "rep", "rev", "hon", "lt", "col", "sgt", "capt", "cmdr", "adm", "vs", "e.g", "i.e"})
_INITIALS = re.compile(r"(?:[A-Za-z]\.)+")            # U.S.  D.C.  J.  (kept inside the sentence)
# A candidate end: terminal punctuation, optional closing quotes/brackets, then whitespace and a
# capital, digit or opening quote. Lower-case continuations ("a.m. tomorrow") are never ends.
_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9])")
# Blank lines (document/paragraph breaks) and bracketed stage directions ("[Applause]") cut the text
# into blocks; sentences, contexts and passages never span two blocks.
_BLOCK_BREAK = re.compile(r"\n\s*\n|\[[^\]\n]*\]")
_WORD = re.compile(r"\S+")


class Sentence(NamedTuple):
    start: int   # text[start:end] is the sentence, exactly as it appears in the text
    end: int
    block: int   # index of the block (paragraph / document piece) holding it


def split_sentences(text: str) -> list[Sentence]:
    """Deterministic regex sentence splitter; keeps "Mr.", "Mrs.", "U.S." and initials inside sentences."""
    sentences: list[Sentence] = []
    block_start = 0
    breaks = [(m.start(), m.end()) for m in _BLOCK_BREAK.finditer(text)] + [(len(text), len(text))]
    for block, (b_end, next_start) in enumerate(breaks):
        pos = block_start
        for m in _END.finditer(text, block_start, b_end):
            if text[m.start()] == "." and _is_abbreviation(text, block_start, m.start()):
                continue
            _add(sentences, text, pos, m.end(), block)
            pos = m.end()
        _add(sentences, text, pos, b_end, block)
        block_start = next_start
    return sentences


def _is_abbreviation(text: str, lo: int, dot: int) -> bool:
    word_start = max(text.rfind(" ", lo, dot), text.rfind("\n", lo, dot)) + 1
    word = text[word_start:dot + 1].lstrip("\"'(\u201c\u2018")
    return word[:-1].lower() in _ABBREVIATIONS or _INITIALS.fullmatch(word) is not None


def _add(out: list[Sentence], text: str, start: int, end: int, block: int) -> None:
    piece = text[start:end]
    stripped = piece.strip()
    if stripped:
        lead = len(piece) - len(piece.lstrip())
        out.append(Sentence(start + lead, start + lead + len(stripped), block))


def _n_words(text: str, s: Sentence) -> int:
    return len(_WORD.findall(text, s.start, s.end))


# --- task construction ----------------------------------------------------------------------------
CHOICE_WORDS = (5, 50)       # true and distractor sentences: long enough to carry content, not walls
PASSAGE_WORDS = (40, 80)     # last-word passages, LAMBADA-like length
_TARGET = re.compile(r"([A-Za-z][A-Za-z'\u2019-]*[A-Za-z])[.!?\"'\u201d\u2019)\]]*")
MIN_TARGET_CHARS = 3
# Distractors within this fraction (at least 2 words) of the answer's length, widened only when a
# small text has too few. Without it, summed log-likelihood (acc) mostly rewards the shortest choice:
# measured on SmolLM2 (40 items), unmatched distractors gave acc 0.225 (chance 0.25) and acc_norm
# 0.525; matched ones give acc 0.40 and acc_norm 0.55.
LENGTH_TOLERANCES = (0.2, 0.5, None)


def build_next_sentence_task(text: str, n_items: int, seed: int) -> list[dict]:
    """Pick-the-true-next-sentence-of-4 items: {"id", "context", "choices", "label"}.

    Context and choices are exact slices of `text`; `context`, then whitespace, then the true choice
    is how the text reads. Distractors are other sentences of the same text of about the answer's
    length, neither inside nor next to the context, with text different from the answer, from the
    context and from one another.
    """
    sents = split_sentences(text)
    n_words = [_n_words(text, s) for s in sents]
    ok = [CHOICE_WORDS[0] <= n <= CHOICE_WORDS[1] for n in n_words]
    anchors = [i for i in range(2, len(sents)) if ok[i] and sents[i - 2].block == sents[i].block]
    pool = [i for i in range(len(sents)) if ok[i]]
    if len(anchors) < n_items or len(pool) < 8:
        raise BadInput(f"next-sentence task: the text yields {len(anchors)} usable items, {n_items} asked; "
                       "use more text or fewer items")
    rng = random.Random(seed)
    items = []
    for k, i in enumerate(sorted(rng.sample(anchors, n_items))):
        n_ctx = 3 if i >= 3 and sents[i - 3].block == sents[i].block and rng.random() < 0.5 else 2
        context = text[sents[i - n_ctx].start:sents[i - 1].end]
        answer = text[sents[i].start:sents[i].end]
        distractors = _distractors(text, sents, n_words, pool, i, n_ctx, rng)
        choices = [answer] + distractors
        rng.shuffle(choices)
        items.append({"id": f"next_sentence-{k:04d}", "context": context, "choices": choices,
                      "label": choices.index(answer)})
    return items


def _distractors(text: str, sents: list[Sentence], n_words: list[int], pool: list[int], i: int, n_ctx: int,
                 rng: random.Random) -> list[str]:
    answer = text[sents[i].start:sents[i].end]
    context = text[sents[i - n_ctx].start:sents[i - 1].end]
    for tol in LENGTH_TOLERANCES:
        limit = None if tol is None else max(2, round(tol * n_words[i]))
        seen, candidates = {answer}, []
        for j in pool:
            # Not the context, the answer, or the sentence right before/after them.
            if i - n_ctx - 1 <= j <= i + 1 or (limit is not None and abs(n_words[j] - n_words[i]) > limit):
                continue
            candidate = text[sents[j].start:sents[j].end]
            if candidate not in seen and candidate not in context:
                seen.add(candidate)
                candidates.append(candidate)
        if len(candidates) >= 3:
            return rng.sample(candidates, 3)
    raise BadInput("next-sentence task: the text has too few distinct sentences for 3 distractors")


def build_last_word_task(text: str, n_items: int, seed: int) -> list[dict]:
    """LAMBADA-style items: {"id", "context", "target"}; `context + " " + target` is an exact slice of
    `text` that ends at a sentence end (the sentence's closing punctuation is left out)."""
    sents = split_sentences(text)
    candidates: list[tuple[int, int, int]] = []     # (passage start, target start, target end)
    for i, s in enumerate(sents):
        last = _WORD.findall(text, s.start, s.end)[-1]
        m = _TARGET.fullmatch(last)
        if m is None or len(m.group(1)) < MIN_TARGET_CHARS or not re.search(r"[.!?]", last):
            continue          # numbers, initials, "it", "go", or a block cut with no sentence end
        t_start = s.end - len(last)
        t_end = t_start + len(m.group(1))
        if text[t_start - 1] != " ":
            continue                                  # so that context + " " + target reads as the text
        words, j = 0, i
        while j >= 0 and sents[j].block == s.block and words < PASSAGE_WORDS[0]:
            words += _n_words(text, sents[j])
            j -= 1
        if PASSAGE_WORDS[0] <= words <= PASSAGE_WORDS[1]:
            candidates.append((sents[j + 1].start, t_start, t_end))
    if len(candidates) < n_items:
        raise BadInput(f"last-word task: the text yields {len(candidates)} usable passages, {n_items} asked; "
                       "use more text or fewer items")
    rng = random.Random(seed)
    picked = sorted(rng.sample(candidates, n_items))
    return [{"id": f"last_word-{k:04d}", "context": text[p:t - 1], "target": text[t:e]}
            for k, (p, t, e) in enumerate(picked)]


# --- JSONL ----------------------------------------------------------------------------------------
def _jsonl_bytes(items: list[dict]) -> bytes:
    return "".join(json.dumps(item, sort_keys=True, ensure_ascii=False) + "\n" for item in items).encode("utf-8")


def write_jsonl(items: list[dict], path: Path) -> str:
    """Canonical JSONL (sorted keys, UTF-8, one "\\n"-terminated line per item); returns its sha256."""
    data = _jsonl_bytes(items)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha256_bytes(data)


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# --- log-likelihood scoring -----------------------------------------------------------------------
def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context whitespace moves to the continuation (its `context.rstrip()`),
    the whole string is tokenized once and the continuation is what follows the context's own tokens
    (BPE merges across the seam would otherwise change the scored tokens). No BOS, as in our perplexity
    protocol (lm-eval adds one only for tokenizers that add it by default; SmolLM2's does not)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.no_grad()
def _loglikelihoods(model: torch.nn.Module, requests: list[tuple[list[int], list[int]]],
                    batch_size: int) -> list[tuple[float, bool]]:
    """(Σ log p(continuation tokens | prefix), every continuation token is the argmax) per request."""
    max_len = int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048) or 2048)
    device = _device(model)
    out: list[tuple[float, bool]] = []
    for s in range(0, len(requests), batch_size):
        rows, conts = [], []
        for ctx, cont in requests[s:s + batch_size]:
            if not cont:
                raise ValueError("empty continuation: nothing to score")
            rows.append((ctx + cont)[-(max_len + 1):][:-1])   # left-truncate like lm-eval
            conts.append(cont)
        width = max(len(r) for r in rows)
        # Right padding needs no attention mask: a causal model's real positions never see later pads.
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        # Only the scored positions need the vocab projection (a fifth of SmolLM2's compute per token).
        # A model that ignores logits_to_keep returns every position; the offset covers both cases.
        keep = width - min(len(r) - len(c) for r, c in zip(rows, conts))
        logits = model(input_ids=ids.to(device), use_cache=False, logits_to_keep=keep).logits
        offset = width - logits.shape[1]
        for b, (r, cont) in enumerate(zip(rows, conts)):
            logp = torch.log_softmax(logits[b, len(r) - len(cont) - offset:len(r) - offset].double(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            ll = float(logp.gather(1, target[:, None]).sum())
            out.append((ll, bool((logp.argmax(-1) == target).all())))
    return out


def score_multiple_choice(model: torch.nn.Module, tokenizer, items: list[dict]) -> dict:
    """acc and acc_norm (log-likelihood / choice length in characters) over next-sentence items."""
    if not items:
        raise ValueError("no items to score")
    acc = acc_norm = 0
    for item in items:
        requests = [_encode_pair(tokenizer, item["context"], " " + c) for c in item["choices"]]
        lls = torch.tensor([ll for ll, _ in _loglikelihoods(model, requests, batch_size=len(requests))],
                           dtype=torch.float64)
        lengths = torch.tensor([float(len(c)) for c in item["choices"]], dtype=torch.float64)
        acc += int(int(lls.argmax()) == item["label"])
        acc_norm += int(int((lls / lengths).argmax()) == item["label"])
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def score_last_word(model: torch.nn.Module, tokenizer, items: list[dict], batch_size: int = 8) -> dict:
    """acc: the greedy continuation reproduces every token of " " + target (lm-eval lambada)."""
    if not items:
        raise ValueError("no items to score")
    requests = [_encode_pair(tokenizer, item["context"], " " + item["target"]) for item in items]
    results = _loglikelihoods(model, requests, batch_size)
    return {"acc": sum(greedy for _, greedy in results) / len(items), "n": len(items)}


def cloze_suite(model: torch.nn.Module, tokenizer, text: str, text_sha256: str, n_items: int, seed: int,
                out_dir: Path) -> dict:
    """Build both tasks, write them to out_dir as JSONL, score them; results carry protocol stamps."""
    out_dir = Path(out_dir)
    tasks = {
        "next_sentence": (build_next_sentence_task(text, n_items, seed), score_multiple_choice, 0.25),
        "last_word": (build_last_word_task(text, n_items, seed), score_last_word, 0.0),
    }
    results = {}
    for name, (items, scorer, chance) in tasks.items():
        file_sha = write_jsonl(items, out_dir / f"{name}.jsonl")
        results[name] = {**scorer(model, tokenizer, items), "chance": chance, "file": f"{name}.jsonl",
                         "file_sha256": file_sha, "seed": seed, "n_items": n_items,
                         "corpus_sha256": text_sha256, "scoring": "log-likelihood, no BOS (lm-eval style)"}
    return results
