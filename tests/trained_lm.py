"""A really small causal LM trained from scratch on Shakespeare, for tests that need real structure.

Random-init tiny models have no learned features; this one has seen text, so its FFN
activations are those of a (small) language model. It trains in seconds on a CPU:
byte-level BPE tokenizer (VOCAB_SIZE tokens) trained on the calibration split, 2 blocks of
width 64 with FFN width 256 (16 experts of 16 neurons), next-token loss with AdamW.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from metanet.calib import load_corpus, split_documents, tokenize_documents

log = logging.getLogger(__name__)

VOCAB_SIZE = 768
EOS = "<|endoftext|>"
SEQ_LEN = 128
BATCH_SIZE = 16
POOL_WINDOWS = 4096  # training windows drawn once from the calibration split, batches sampled from them
POOL_STRIDE = 2  # the pool comes from every other calibration play: enough text, half the tokenising time
HELDOUT_TOKENS = 64 * SEQ_LEN
TOKENIZER_CHARS = 1_000_000  # characters of the calibration split the BPE merges are learned on
MAX_THREADS = 4


def train_tokenizer(docs: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE (GPT-2 style) learned on the first TOKENIZER_CHARS characters of docs, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "\n\n".join(docs)[:TOKENIZER_CHARS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def build_model(family: str, vocab_size: int, eos_id: int) -> torch.nn.Module:
    """A randomly initialised tiny causal LM: d=64, f=256, 2 blocks, 4 heads, no dropout."""
    import transformers as tf

    ids = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    if family == "llama":
        config = tf.LlamaConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=SEQ_LEN, tie_word_embeddings=True, **ids,
        )
        return tf.LlamaForCausalLM(config)
    if family == "gpt2":
        config = tf.GPT2Config(
            n_embd=64, n_inner=256, n_layer=2, n_head=4, n_positions=SEQ_LEN,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
        return tf.GPT2LMHeadModel(config)
    raise ValueError(f"unknown family {family!r}; expected 'llama' or 'gpt2'")


def heldout_loss(model: torch.nn.Module, input_ids: torch.LongTensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) of model on input_ids [N, S]."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size]  # [B, S]
            n = batch[:, 1:].numel()
            total += model(input_ids=batch, labels=batch).loss.item() * n
            count += n
    return total / count


def unigram_entropy(input_ids: torch.LongTensor) -> float:
    """Entropy (nats) of the empirical token distribution of input_ids [N, S] at the predicted positions 1…S−1:
    the cross-entropy of the best unigram model of these very tokens, so every unigram model scores ≥ this."""
    counts = torch.bincount(input_ids[:, 1:].reshape(-1)).double()  # [V]
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum().item()


def heldout_windows(tokenizer, seed: int = 0) -> torch.LongTensor:
    """[HELDOUT_TOKENS / SEQ_LEN, SEQ_LEN] windows of the held-out plays of the default split."""
    _, heldout = split_documents(load_corpus(), seed=seed)
    return tokenize_documents(tokenizer, heldout, HELDOUT_TOKENS, SEQ_LEN, seed=seed)


def train_tiny_causal_lm(folder: Path, family: str = "llama", steps: int = 300, seed: int = 0) -> Path:
    """Train the tiny LM of `family` ("llama" or "gpt2") from random init and save model and tokenizer
    (safetensors) into folder; returns folder.

    `steps` AdamW steps on batches of BATCH_SIZE windows from the calibration plays (linear warmup,
    cosine decay to 10% of lr 3e-3); at most MAX_THREADS torch threads, restored afterwards. Logs the
    held-out loss next to the best unigram cross-entropy of the held-out plays."""
    folder = Path(folder)
    calib, heldout = split_documents(load_corpus(), seed=seed)
    tokenizer = train_tokenizer(calib)
    train_ids = tokenize_documents(tokenizer, calib[::POOL_STRIDE], POOL_WINDOWS * SEQ_LEN, SEQ_LEN, seed=seed)  # [POOL_WINDOWS, S]
    heldout_ids = tokenize_documents(tokenizer, heldout, HELDOUT_TOKENS, SEQ_LEN, seed=seed)  # [64, S]

    threads = torch.get_num_threads()
    torch.set_num_threads(min(MAX_THREADS, os.cpu_count() or 1))
    try:
        torch.manual_seed(seed)
        model = build_model(family, len(tokenizer), tokenizer.eos_token_id)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
        warmup = max(1, steps // 15)
        schedule = lambda step: min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for step in range(steps):
            batch = train_ids[torch.randint(len(train_ids), (BATCH_SIZE,), generator=generator)]  # [B, S]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        model.eval()
        log.info(
            "tiny %s LM: %d steps, held-out loss %.3f nats vs best unigram %.3f",
            family, steps, heldout_loss(model, heldout_ids), unigram_entropy(heldout_ids),
        )
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
