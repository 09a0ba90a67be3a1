"""A really small causal LM trained from scratch on Shakespeare, for tests that need real structure.

Random-init tiny models have no learned features; this one has seen text, so its FFN
activations are those of a (small) language model. It trains in seconds on a CPU:
byte-level BPE tokenizer (VOCAB_SIZE tokens) trained on the calibration split, 2 blocks of
width 64 with FFN width 256 (16 experts of 16 neurons), next-token loss with AdamW.
The pieces (tokenizer, model, training loop) are the zoo builder's, from `training`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from metanet.calib import load_corpus, split_documents, tokenize_documents
from training.lm import LMTrainer, build_lm, unigram_entropy
from training.lm import token_loss as heldout_loss
from training.specs import LMShape, TrainSettings
from training.tokenizer import train_bpe_tokenizer

log = logging.getLogger(__name__)

__all__ = ["heldout_loss", "heldout_windows", "train_tiny_causal_lm", "unigram_entropy"]

VOCAB_SIZE = 768
SEQ_LEN = 128
BATCH_SIZE = 16
POOL_WINDOWS = 4096  # training windows drawn once from the calibration split, batches sampled from them
POOL_STRIDE = 2  # the pool comes from every other calibration play: enough text, half the tokenising time
HELDOUT_TOKENS = 64 * SEQ_LEN
MAX_THREADS = 4


def heldout_windows(tokenizer, seed: int = 0) -> torch.LongTensor:
    """[HELDOUT_TOKENS / SEQ_LEN, SEQ_LEN] windows of the held-out plays of the default split."""
    _, heldout = split_documents(load_corpus(), seed=seed)
    return tokenize_documents(tokenizer, heldout, HELDOUT_TOKENS, SEQ_LEN, seed=seed)


def train_tiny_causal_lm(folder: Path, family: str = "llama", steps: int = 300, seed: int = 0) -> Path:
    """Train the tiny LM of `family` ("llama" or "gpt2": d=64, f=256, 2 blocks, 4 heads) from random
    init and save model and tokenizer (safetensors) into folder; returns folder.

    `steps` AdamW steps on batches of BATCH_SIZE windows from the calibration plays (linear warmup,
    cosine decay to 10% of lr 3e-3); at most MAX_THREADS torch threads, restored afterwards. Logs the
    held-out loss next to the best unigram cross-entropy of the held-out plays."""
    if family not in ("llama", "gpt2"):
        raise ValueError(f"unknown family {family!r}; expected 'llama' or 'gpt2'")
    folder = Path(folder)
    calib, heldout = split_documents(load_corpus(), seed=seed)
    tokenizer = train_bpe_tokenizer(calib, VOCAB_SIZE)
    train_ids = tokenize_documents(tokenizer, calib[::POOL_STRIDE], POOL_WINDOWS * SEQ_LEN, SEQ_LEN, seed=seed)  # [POOL_WINDOWS, S]
    heldout_ids = tokenize_documents(tokenizer, heldout, HELDOUT_TOKENS, SEQ_LEN, seed=seed)  # [64, S]

    threads = torch.get_num_threads()
    torch.set_num_threads(min(MAX_THREADS, os.cpu_count() or 1))
    try:
        torch.manual_seed(seed)
        model = build_lm(LMShape(family, 64, 256, 2, 4, SEQ_LEN), len(tokenizer), tokenizer.eos_token_id)
        trainer = LMTrainer(model, TrainSettings(), steps)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            trainer.step(train_ids[torch.randint(len(train_ids), (BATCH_SIZE,), generator=generator)])  # [B, S]
        log.info(
            "tiny %s LM: %d steps, held-out loss %.3f nats vs best unigram %.3f",
            family, steps, heldout_loss(model, heldout_ids), unigram_entropy(heldout_ids),
        )
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
