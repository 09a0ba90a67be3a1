"""Calibration windows a model writes itself: data-driven methods and routers without any text.

A causal LM samples each window from its own distribution (temperature 1, no top-k or top-p
truncation), starting from a uniformly drawn first token; an encoder cannot write text, so its
windows are uniformly drawn token ids. The FFN inputs of such windows carry the model's own
input statistics — correlated coordinates, norm scales, the token structure it learnt — which
the metanetwork's Gaussian synthetic inputs do not. benchmarks/results/generated-calibration.md
measures what that buys against real calibration text.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from metanet.calib.capture import ENCODER_FAMILIES

log = logging.getLogger(__name__)


def generated_windows(
    model: torch.nn.Module,
    family: str,
    n_tokens: int,
    seq_len: int = 128,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> torch.LongTensor:
    """⌈n_tokens / seq_len⌉ windows [N, seq_len] written by `model` (module docstring), deterministic in `seed`.

    Sampling runs on the model's device under torch.no_grad() with its own random stream, so the
    caller's random state is left as it was; `progress(1)` is called after each batch of windows.
    """
    n_windows = -(-n_tokens // seq_len)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    if family in ENCODER_FAMILIES:
        return torch.randint(vocab, (n_windows, seq_len), generator=generator)
    first = torch.randint(vocab, (n_windows, 1), generator=generator)  # [N, 1]
    device = next(model.parameters()).device
    windows = []
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, n_windows, batch_size):
            prompt = first[start : start + batch_size].to(device)
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=0,
            )
            windows.append(out.cpu())  # [B, seq_len]
            if progress is not None:
                progress(1)
    log.info("%s wrote %d calibration windows of %d tokens", type(model).__name__, n_windows, seq_len)
    return torch.cat(windows)
