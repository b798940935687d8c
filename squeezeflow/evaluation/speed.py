"""Inference speed: prefill and greedy-decode tokens per second, and ratios against the base model.

Decoding is a hand-written greedy loop over the KV cache rather than `generate`: it always runs exactly
`new_tokens` steps (a random or compressed model may emit EOS early), and the prefill can be timed
apart from the decode steps. Thread counts are left as the caller set them; they are recorded.
Timings on a shared machine are noisy: `speed_ratios` interleaves the two models so that load changes
hit both, and every number is a median over repeats.
"""
from __future__ import annotations

import statistics
import time

import torch

_PROMPT_SEED = 0


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(model: torch.nn.Module, batch: int, prompt_len: int) -> torch.Tensor:
    # Token ids from a fixed generator: speed does not depend on the text, only on its length.
    g = torch.Generator().manual_seed(_PROMPT_SEED)
    return torch.randint(0, int(model.config.vocab_size), (batch, prompt_len), generator=g)


@torch.inference_mode()
def _time_once(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one prompt forward and `new_tokens` cached greedy steps."""
    device = _device(model)
    ids = ids.to(device)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    past = out.past_key_values
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _summary(times: list[tuple[float, float]], batch: int, prompt_len: int, new_tokens: int) -> dict:
    prefill_s = statistics.median(t[0] for t in times)
    decode_s = statistics.median(t[1] for t in times)
    return {"prefill_tokens_per_s": batch * prompt_len / prefill_s,
            "decode_tokens_per_s": batch * new_tokens / decode_s,
            "prefill_s": prefill_s, "decode_s": decode_s}


def _settings(model: torch.nn.Module, prompt_len: int, new_tokens: int, batch: int, repeats: int,
              warmup: int) -> dict:
    device = _device(model)
    param = next(model.parameters(), None)
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch, "repeats": repeats,
            "warmup": warmup, "statistic": "median", "device": str(device),
            "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
            "threads": torch.get_num_threads(), "decode": "greedy, KV cache, fixed length"}


def _check(prompt_len: int, new_tokens: int, batch: int, repeats: int, warmup: int) -> None:
    if prompt_len < 1 or new_tokens < 1 or batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError("speed needs prompt_len, new_tokens, batch, repeats >= 1 and warmup >= 0 "
                         f"(got {prompt_len}, {new_tokens}, {batch}, {repeats}, {warmup})")


def measure_speed(model: torch.nn.Module, prompt_len: int = 128, new_tokens: int = 32, batch: int = 1,
                  repeats: int = 3, warmup: int = 1) -> dict:
    """Prefill tokens/s (one forward of `prompt_len` tokens) and decode tokens/s (median of repeats)."""
    _check(prompt_len, new_tokens, batch, repeats, warmup)
    ids = _prompt(model, batch, prompt_len)
    for _ in range(warmup):
        _time_once(model, ids, new_tokens)
    times = [_time_once(model, ids, new_tokens) for _ in range(repeats)]
    return {**_summary(times, batch, prompt_len, new_tokens),
            "settings": _settings(model, prompt_len, new_tokens, batch, repeats, warmup)}


def speed_ratios(model: torch.nn.Module, base: torch.nn.Module, prompt_len: int = 128, new_tokens: int = 32,
                 batch: int = 1, repeats: int = 3, warmup: int = 1) -> dict:
    """Both models measured in one call, interleaved (base, model, model, base, ...); ratios are
    model / base tokens per second, so > 1 means the compressed model is faster."""
    _check(prompt_len, new_tokens, batch, repeats, warmup)
    ids = _prompt(base, batch, prompt_len)
    pair = {"base": base, "model": model}
    for _ in range(warmup):
        for m in pair.values():
            _time_once(m, ids, new_tokens)
    times: dict[str, list[tuple[float, float]]] = {"base": [], "model": []}
    for r in range(repeats):
        # ABBA order (base, model, model, base, ...): a steady drift in machine load hits both alike.
        for name in (("base", "model") if r % 2 == 0 else ("model", "base")):
            times[name].append(_time_once(pair[name], ids, new_tokens))
    base_s = _summary(times["base"], batch, prompt_len, new_tokens)
    model_s = _summary(times["model"], batch, prompt_len, new_tokens)
    return {"base": base_s, "model": model_s,
            "prefill_ratio": model_s["prefill_tokens_per_s"] / base_s["prefill_tokens_per_s"],
            "decode_ratio": model_s["decode_tokens_per_s"] / base_s["decode_tokens_per_s"],
            "settings": _settings(model, prompt_len, new_tokens, batch, repeats, warmup)}
