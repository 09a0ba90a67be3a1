"""What to train, as plain data (no torch): model families, shapes and optimiser settings.

Kept apart from training.lm so that reading a zoo config (and `metanet --help`) stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("gpt2", "opt", "llama", "gpt_neox")


@dataclass(frozen=True)
class LMShape:
    family: str  # one of FAMILIES
    d_model: int
    d_ff: int
    n_layers: int
    n_heads: int
    max_positions: int  # longest sequence the model sees


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 3e-3
    weight_decay: float = 0.01
    beta2: float = 0.95  # β1 = 0.9
    warmup_fraction: float = 1 / 15  # of the total steps, at least one step
    final_lr_fraction: float = 0.1  # the cosine ends at this fraction of lr
    clip_norm: float = 1.0
