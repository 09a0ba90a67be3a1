"""Small causal LMs trained from random init: build one with a transformers class, train it, score it.

Families (the FFN each puts into the zoo):
    gpt2      GPT2LMHeadModel      GELU (tanh), biases, LayerNorm, Conv1D weights
    opt       OPTForCausalLM       ReLU, biases, LayerNorm
    llama     LlamaForCausalLM     gated SiLU, no biases, RMSNorm
    gpt_neox  GPTNeoXForCausalLM   GELU, biases, LayerNorm, parallel attention + FFN
Every model has no dropout and ties its output layer to the token embedding.

Windows are always full (no padding), so every position is attended.
Training (LMTrainer): next-token cross-entropy, AdamW, gradient clipping, linear warm-up
then cosine decay from `lr` to `final_lr_fraction · lr` over the run's total steps.
"""

from __future__ import annotations

import math

import torch

from training.specs import FAMILIES, LMShape, TrainSettings


def build_lm(shape: LMShape, vocab_size: int, eos_id: int) -> torch.nn.Module:
    """A randomly initialised causal LM of `shape` (seed torch before calling for a reproducible init)."""
    model = _build(shape, vocab_size, eos_id)
    model.loss_type = "ForCausalLM"  # transformers infers it from the class name, which GPT2LMHeadModel's lacks
    return model


def _build(shape: LMShape, vocab_size: int, eos_id: int) -> torch.nn.Module:
    import transformers as tf

    ids = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=True)
    d, f, n, heads = shape.d_model, shape.d_ff, shape.n_layers, shape.n_heads
    if shape.family == "gpt2":
        config = tf.GPT2Config(
            n_embd=d, n_inner=f, n_layer=n, n_head=heads, n_positions=shape.max_positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
        return tf.GPT2LMHeadModel(config)
    if shape.family == "opt":
        config = tf.OPTConfig(
            hidden_size=d, ffn_dim=f, num_hidden_layers=n, num_attention_heads=heads, word_embed_proj_dim=d,
            max_position_embeddings=shape.max_positions, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **ids,
        )
        return tf.OPTForCausalLM(config)
    if shape.family == "llama":
        config = tf.LlamaConfig(
            hidden_size=d, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=shape.max_positions, **ids,
        )
        return tf.LlamaForCausalLM(config)
    if shape.family == "gpt_neox":
        config = tf.GPTNeoXConfig(
            hidden_size=d, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads,
            max_position_embeddings=shape.max_positions, hidden_dropout=0.0, attention_dropout=0.0, **ids,
        )
        return tf.GPTNeoXForCausalLM(config)
    raise ValueError(f"unknown family {shape.family!r}; expected one of {', '.join(FAMILIES)}")


class LMTrainer:
    """AdamW steps on batches of token windows; `step` returns the batch's loss before the update."""

    def __init__(self, model: torch.nn.Module, settings: TrainSettings, total_steps: int):
        self.model = model
        self.settings = settings
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, settings.beta2), weight_decay=settings.weight_decay)
        warmup = max(1, round(total_steps * settings.warmup_fraction))
        low = settings.final_lr_fraction

        def schedule(step: int) -> float:
            cosine = low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
            return min(1.0, (step + 1) / warmup) * cosine

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def step(self, batch: torch.LongTensor) -> float:
        """One update on batch [B, S] (next-token loss over positions 1…S−1)."""
        self.model.train()
        loss = self.model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()


def random_windows(stream: torch.LongTensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.LongTensor:
    """batch_size windows of seq_len consecutive tokens at uniformly drawn offsets.   stream: [N] → [B, S]"""
    starts = torch.randint(stream.numel() - seq_len + 1, (batch_size,), generator=generator)  # [B]
    return stream[starts[:, None] + torch.arange(seq_len)]


@torch.no_grad()
def token_loss(model: torch.nn.Module, input_ids: torch.LongTensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) of model on input_ids [N, S], in eval mode."""
    model.eval()
    total, count = 0.0, 0
    for batch in input_ids.split(batch_size):  # [B, S]
        n = batch[:, 1:].numel()
        total += model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss.item() * n
        count += n
    return total / count


def unigram_entropy(input_ids: torch.LongTensor) -> float:
    """Entropy (nats) of the empirical token distribution of input_ids [N, S] at the predicted positions 1…S−1:
    the cross-entropy of the best unigram model of these very tokens, so every unigram model scores ≥ this."""
    counts = torch.bincount(input_ids[:, 1:].reshape(-1)).double()  # [V]
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum().item()
