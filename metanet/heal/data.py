"""Token windows for healing: training windows from the calibration split, held-out windows for the metrics.

The corpus is split by whole document exactly as every other command splits it
(`metanet.calib.split_documents`, seed 0), so ppl_ratio during healing is measured on
text the healing never trains on. Training draws batches from *every* full window of the
calibration split, reshuffled each epoch; a token budget larger than the split simply
runs several epochs.
"""

from __future__ import annotations

import logging

import torch

from metanet.calib.corpus import split_documents, token_stream, tokenize_documents
from metanet.errors import MetanetError

log = logging.getLogger(__name__)


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


class HealData:
    """Training windows (all of the calibration split) and held-out windows (eval_tokens of the held-out split).

    train_ids: [N_train, seq_len]   heldout_ids: [ceil(eval_tokens / seq_len), seq_len]
    """

    def __init__(self, tokenizer, docs: list[str], seq_len: int, eval_tokens: int, seed: int = 0):
        calibration, heldout = split_documents(docs, seed=0)  # the split every command agrees on
        self.train_ids = pack_windows(tokenizer, calibration, seq_len)
        self.heldout_ids = tokenize_documents(tokenizer, heldout, eval_tokens, seq_len=seq_len, seed=seed)
        self.seed = seed
        log.info("healing text: %d training windows, %d held-out windows of %d tokens", len(self.train_ids), len(self.heldout_ids), seq_len)

    def train_dataloader(self, batch_size: int) -> torch.utils.data.DataLoader:
        """Shuffled batches [batch_size, seq_len] of training windows (seeded; incomplete batches dropped)."""
        from torch.utils.data import DataLoader, TensorDataset

        if batch_size > len(self.train_ids):
            raise MetanetError(f"--batch-size {batch_size} is more than the {len(self.train_ids)} training windows the corpus holds; use a larger corpus or a smaller batch")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(self.train_ids), batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
