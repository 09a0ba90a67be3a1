"""Token windows for healing: training windows (corpus text or windows the teacher writes), held-out windows for the metrics.

Two sources of training windows (`HealSettings.data`, DATA_SOURCES):

    text       every full window of the corpus's calibration split. The corpus is split by whole
               document exactly as every other command splits it (`metanet.calib.split_documents`,
               seed 0), so ppl_ratio during healing is measured on text the healing never trains on.
    generated  a pool of windows the dense teacher writes itself (sampled as
               `metanet.calib.generated_windows` samples them: temperature 1, no truncation, a
               uniformly drawn first token); no corpus text is trained on. The pool is sampled once
               at the start of a run and kept in the run's work folder (`generated_pool`), so a
               resumed run trains on the very same windows instead of sampling again.

Either way training draws batches from every window, reshuffled each epoch; a token budget larger
than the windows simply runs several epochs. Held-out windows always come from the corpus's
held-out split: quality is measured on real text whatever the model trained on.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from metanet.calib.corpus import split_documents, token_stream, tokenize_documents
from metanet.calib.generated import generated_windows
from metanet.errors import MetanetError
from metanet.heal.settings import DATA_SOURCES

log = logging.getLogger(__name__)

__all__ = ["DATA_SOURCES", "HealData", "generated_pool", "pack_windows"]
#: Windows the teacher samples per `generate` call when it writes a pool (SmolLM2-135M on 2 shared CPU cores:
#: 100 tokens/s at 16 windows a call, 180 at 64, 199 at 128).
POOL_BATCH = 64


def pack_windows(tokenizer, docs: list[str], seq_len: int) -> torch.LongTensor:
    """Every full window of the packed token stream.   → [N, seq_len]

    Packing as in `metanet.calib.tokenize_documents`: documents tokenised without special
    tokens, joined by the tokenizer's EOS (or SEP) token, cut into non-overlapping windows;
    the tail shorter than seq_len is dropped. No full window → MetanetError.
    """
    stream = token_stream(tokenizer, docs)
    n = len(stream) // seq_len
    if n == 0:
        raise MetanetError(f"not enough text: the calibration split has {len(stream)} tokens, less than one window of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def generated_pool(
    teacher: torch.nn.Module,
    family: str,
    n_tokens: int,
    seq_len: int,
    seed: int,
    path: Path | None = None,
    identity: dict | None = None,
    any_size: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> torch.LongTensor:
    """⌈n_tokens / seq_len⌉ windows [N, seq_len] written by `teacher` (module docstring), deterministic in `seed`.

    With `path`: a pool already stored there is read back instead of sampled when it was written for the
    same `identity` (e.g. the teacher it came from), seed and seq_len, and the same size unless `any_size`
    (a resumed run keeps the pool it started with even when its token budget grew); otherwise the pool is
    sampled and written there (to a temporary file, then renamed). `progress(done, total)` is called with
    the tokens written so far after each batch of POOL_BATCH windows; INFO log lines report every ~10%.
    """
    n_windows = -(-n_tokens // seq_len)
    meta = {"seed": seed, "seq_len": seq_len, **(identity or {})}
    if path is not None and path.is_file():
        stored = read_pool(path)
        if stored is not None:
            windows, stored_meta = stored
            if stored_meta == meta and (any_size or len(windows) == n_windows):
                log.info("healing windows: reusing the %d windows of %d tokens the teacher wrote (%s)", len(windows), seq_len, path)
                return windows
        log.info("healing windows: %s was written for another run; sampling a new pool", path)
    total, batches = n_windows * seq_len, -(-n_windows // POOL_BATCH)
    log.info("healing windows: the teacher writes %d windows of %d tokens (%d tokens, %d batches)", n_windows, seq_len, total, batches)
    done = 0

    def step(_: int) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done * POOL_BATCH, n_windows) * seq_len, total)
        if done == batches or done * 10 // batches > (done - 1) * 10 // batches:
            log.info("healing windows: %d of %d tokens written", min(done * POOL_BATCH, n_windows) * seq_len, total)

    windows = generated_windows(teacher, family, n_windows * seq_len, seq_len=seq_len, seed=seed, batch_size=POOL_BATCH, progress=step)
    if path is not None:
        write_pool(path, windows, meta)
    return windows


def write_pool(path: Path, windows: torch.LongTensor, meta: dict) -> None:
    """Store a pool of windows [N, S] with what it was written for (safetensors metadata), atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({"windows": windows.contiguous()}, tmp, metadata={"heal_pool": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


def read_pool(path: Path) -> tuple[torch.LongTensor, dict] | None:
    """(windows [N, S], the metadata they were written with) of a stored pool; None when the file is not a readable pool."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["heal_pool"])
            return f.get_tensor("windows"), meta
    except Exception as exc:  # noqa: BLE001  a truncated or foreign file is sampled again, never trusted
        log.warning("healing windows: cannot read %s (%s); sampling a new pool", path, exc)
        return None


class HealData:
    """Training windows and held-out windows (eval_tokens of the corpus's held-out split).

    train_ids: [N_train, seq_len] — source "text": every full window of the calibration split;
    source "generated": None until the caller sets it (a `generated_pool`, sampled once the run's
    work folder exists);  heldout_ids: [ceil(eval_tokens / seq_len), seq_len]
    """

    def __init__(self, tokenizer, docs: list[str], seq_len: int, eval_tokens: int, seed: int = 0, source: str = "text"):
        if source not in DATA_SOURCES:
            raise MetanetError(f"--data must be one of {', '.join(DATA_SOURCES)}, got {source!r}")
        calibration, heldout = split_documents(docs, seed=0)  # the split every command agrees on
        self.source = source
        self.train_ids: torch.LongTensor | None = pack_windows(tokenizer, calibration, seq_len) if source == "text" else None
        self.heldout_ids = tokenize_documents(tokenizer, heldout, eval_tokens, seq_len=seq_len, seed=seed)
        self.seed = seed
        log.info("healing windows: %s training windows, %d held-out windows of %d tokens",
                 len(self.train_ids) if self.train_ids is not None else "generated", len(self.heldout_ids), seq_len)

    def train_dataloader(self, batch_size: int) -> torch.utils.data.DataLoader:
        """Shuffled batches [batch_size, seq_len] of training windows (seeded; incomplete batches dropped)."""
        from torch.utils.data import DataLoader, TensorDataset

        if self.train_ids is None:
            raise MetanetError("no training windows: sample the generated pool first (metanet.heal.data.generated_pool)")
        if batch_size > len(self.train_ids):
            where = "the corpus holds; use a larger corpus" if self.source == "text" else "the generated pool holds; use a larger --pool-tokens"
            raise MetanetError(f"--batch-size {batch_size} is more than the {len(self.train_ids)} training windows {where} or a smaller batch")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(self.train_ids), batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
