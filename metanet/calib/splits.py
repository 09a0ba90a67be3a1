"""Calibration and held-out text for one checkpoint, ready to use.

The corpus is split by whole documents (seeded, disjoint); the calibration split feeds
partitioners and routers, the held-out split feeds every metric, so no metric is
measured on text a partition saw. Calibration can also come from windows the model
writes itself (`calibration_split(..., source="generated")`, metanet.calib.generated):
no text at all; held-out metrics always use real text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from metanet.calib.capture import FFNInputs, capture_ffn_inputs
from metanet.calib.corpus import split_documents, tokenize_documents
from metanet.calib.generated import generated_windows
from metanet.errors import MetanetError

SPLITS = ("calibration", "heldout")
#: text: the corpus's calibration half; generated: windows the model writes itself; mix: half of each.
CALIBRATION_SOURCES = ("text", "generated", "mix")


@dataclass
class TextSplit:
    name: str  # "calibration" | "heldout" | "generated"
    input_ids: torch.LongTensor  # [N, seq_len]
    ffn_inputs: FFNInputs  # every block's FFN input on these tokens (dense model)
    seconds: float  # time to tokenise and capture

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()


def text_split(
    model,
    tokenizer,
    family: str,
    split: str,
    n_tokens: int,
    corpus: list[str],
    seq_len: int = 128,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> TextSplit:
    """Tokenise `n_tokens` of the `split` half of `corpus` (documents from `load_corpus`, read
    before the model so a bad corpus fails fast) and capture the dense model's FFN inputs.

    The document split always uses seed 0 so that every command agrees on which text is
    held out; `seed` only chooses the windows drawn from that half.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    start = time.perf_counter()
    calibration_docs, heldout_docs = split_documents(corpus, seed=0)
    docs = calibration_docs if split == "calibration" else heldout_docs
    input_ids = tokenize_documents(tokenizer, docs, n_tokens, seq_len=seq_len, seed=seed)
    inputs = capture_ffn_inputs(model, family, input_ids, progress=progress)
    return TextSplit(split, input_ids, inputs, time.perf_counter() - start)


def calibration_windows(
    model,
    tokenizer,
    family: str,
    n_tokens: int,
    corpus: list[str] | None,
    source: str = "text",
    seed: int = 0,
    seq_len: int = 128,
    progress: Callable[[int], None] | None = None,
) -> torch.LongTensor:
    """⌈n_tokens / seq_len⌉ calibration windows [N, seq_len]: `n_tokens` of the corpus's calibration half (source "text"),
    windows the model writes itself ("generated"; `corpus` unused), or half of each ("mix": text first).
    The document split always uses seed 0 (as `text_split`); `seed` chooses the windows and the sampling."""
    if source not in CALIBRATION_SOURCES:
        raise MetanetError(f"calibration source must be one of {', '.join(CALIBRATION_SOURCES)}, got {source!r}")
    text_tokens = {"text": n_tokens, "generated": 0, "mix": n_tokens // 2}[source]
    parts = []
    if text_tokens:
        parts.append(tokenize_documents(tokenizer, split_documents(corpus, seed=0)[0], text_tokens, seq_len=seq_len, seed=seed))
    if n_tokens - text_tokens > 0:
        parts.append(generated_windows(model, family, n_tokens - text_tokens, seq_len=seq_len, seed=seed, progress=progress))
    return torch.cat(parts)


def calibration_split(
    model,
    tokenizer,
    family: str,
    n_tokens: int,
    corpus: list[str] | None,
    source: str = "text",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> TextSplit:
    """The calibration windows of `calibration_windows` and the dense model's FFN inputs on them."""
    start = time.perf_counter()
    input_ids = calibration_windows(model, tokenizer, family, n_tokens, corpus, source, seed, progress=progress)
    inputs = capture_ffn_inputs(model, family, input_ids, progress=progress)
    return TextSplit("calibration" if source == "text" else source, input_ids, inputs, time.perf_counter() - start)
