"""HealSettings: every number that decides a healing run (no heavy imports: the CLI reads its defaults)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from metanet.errors import MetanetError

#: What `--train` may name: the routers alone, or every MoEFFN tensor (experts, their biases, routers).
TRAIN_MODES = ("routers", "routers+experts")
#: Lightning precisions healing accepts: float32 everywhere, or bf16 autocast on GPUs.
PRECISIONS = ("32-true", "bf16-mixed")
#: What `--data` may name: the corpus's calibration text, or windows the dense teacher writes itself (metanet.heal.data).
DATA_SOURCES = ("text", "generated")


@dataclass(frozen=True)
class HealSettings:
    """Everything that decides a healing run (configs/heal.yaml holds the defaults the CLI uses)."""

    tokens: int = 1_000_000  # training token budget; steps = ceil(tokens / (batch_size · seq_len))
    train: str = "routers+experts"  # one of TRAIN_MODES
    data: str = "text"  # one of DATA_SOURCES: where the training windows come from
    pool_tokens: int = 262_144  # data "generated": tokens the teacher writes once per run (at most what training reads)
    lr: float = 3e-4  # AdamW, no weight decay, linear warmup then constant (1e-3 wandered on SmolLM2: real-llm-heal.md)
    batch_size: int = 8
    seq_len: int = 128
    output_weight: float = 1.0  # w_out
    ffn_weight: float = 1.0  # w_ffn
    balance_weight: float = 0.01  # w_bal
    warmup_steps: int = 20
    eval_tokens: int = 8192  # held-out tokens for ppl_ratio / embedding_cosine and rel_error
    eval_every: int = 100_000  # training tokens between held-out evaluations (also at 0 and at the end)
    checkpoint_every: int = 50  # optimizer steps between resume points in the work folder
    seed: int = 0
    precision: str = "32-true"  # one of PRECISIONS

    def check(self) -> None:
        """MetanetError naming the first setting out of range."""
        if self.train not in TRAIN_MODES:
            raise MetanetError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
        if self.data not in DATA_SOURCES:
            raise MetanetError(f"--data must be one of {', '.join(DATA_SOURCES)}, got {self.data!r}")
        for name in ("tokens", "pool_tokens", "batch_size", "warmup_steps", "eval_tokens", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise MetanetError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise MetanetError(f"--seq-len must be ≥ 2, got {self.seq_len}")
        if self.data == "generated" and self.pool_tokens < self.batch_size * self.seq_len:
            raise MetanetError(f"--pool-tokens {self.pool_tokens} is less than one batch ({self.batch_size} windows of {self.seq_len} tokens)")
        if self.precision not in PRECISIONS:
            raise MetanetError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.lr > 0:
            raise MetanetError(f"--lr must be > 0, got {self.lr}")
        for name in ("output_weight", "ffn_weight", "balance_weight"):
            if getattr(self, name) < 0:
                raise MetanetError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))

    @property
    def pool_size(self) -> int:
        """Tokens of the generated pool a fresh run samples: pool_tokens, or fewer when training reads fewer."""
        return min(self.pool_tokens, self.steps * self.batch_size * self.seq_len)

    def as_dict(self) -> dict:
        return asdict(self)
