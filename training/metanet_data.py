"""The zoo as training data for the metanetwork: one sample per FFN layer of a zoo member.

A sample (`LayerSample`) carries the layer's weights, its cached calibration FFN inputs split
into training tokens (the first `train_tokens`, subsampled per step) and validation tokens (the
last `val_tokens`, never trained on), its cached neuron statistics, and for each teacher
operating point the assignment of the teacher with the lowest held-out rel_error on this very
layer (teachers.json). Train / val / test follow the zoo manifest's split of each member.

Augmentation (training only): a random permutation of the hidden neurons (weights, statistics
and teacher labels together) and a random subset of the training tokens. ReLU rescalings are
not sampled: the features are invariant to them by normalisation (metanet.model.features).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from metanet.calib.stats import NeuronStats
from metanet.checkpoints import FFNLayer, open_checkpoint
from metanet.errors import MetanetError
from metanet.partition import Partition
from training.member_cache import load_ffn_inputs, load_neuron_stats, load_teachers
from training.zoo import read_manifest

log = logging.getLogger(__name__)


@dataclass
class LayerSample:
    member: str
    index: int
    layer: FFNLayer
    x: torch.Tensor  # [T, d] float32 training tokens
    x_val: torch.Tensor  # [Tv, d] float32 held-back tokens
    stats: NeuronStats  # activation rate and mean |a| on the member's calibration tokens (no co-activation)
    teachers: dict[str, torch.Tensor]  # "E16-k4-s0" → best teacher's assign [f] int64


def point_key(experts: int, active: int, shared: int) -> str:
    return f"E{experts}-k{active}-s{shared}"


class ZooLayers(Dataset):
    """Every FFN layer of the given members; member files are read once and kept."""

    def __init__(self, root: Path, names: list[str], train_tokens: int, val_tokens: int, augment: bool, seed: int = 0):
        self.root, self.train_tokens, self.val_tokens, self.augment = root, train_tokens, val_tokens, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.items = [(name, i) for name in names for i in range(open_checkpoint(root / "members" / name).n_layers)]
        self._members: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> LayerSample:
        name, i = self.items[item]
        member = self._member(name)
        x = member["inputs"][i].float()
        if x.shape[0] <= self.val_tokens:
            raise MetanetError(f"zoo member {name} caches {x.shape[0]} tokens, fewer than val_tokens={self.val_tokens} + 1")
        x_train, x_val = x[: -self.val_tokens][: self.train_tokens], x[-self.val_tokens :]
        f = member["layers"][i].d_ff
        stats = NeuronStats(member["stats"][i]["activation_rate"], member["stats"][i]["mean_abs"],
                            torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0), (f, f), check_invariants=False), x.shape[0])
        sample = LayerSample(name, i, member["layers"][i], x_train, x_val, stats, member["teachers"][i])
        return self._augmented(sample) if self.augment else sample

    def _augmented(self, sample: LayerSample) -> LayerSample:
        perm = torch.randperm(sample.layer.d_ff, generator=self.generator)
        tokens = torch.randperm(sample.x.shape[0], generator=self.generator)[: self.train_tokens]
        stats = dataclasses.replace(sample.stats, activation_rate=sample.stats.activation_rate[perm], mean_abs=sample.stats.mean_abs[perm])
        return dataclasses.replace(sample, layer=sample.layer.permute_hidden(perm), x=sample.x[tokens], stats=stats,
                                   teachers={key: assign[perm] for key, assign in sample.teachers.items()})

    def _member(self, name: str) -> dict:
        if name not in self._members:
            folder = self.root / "members" / name
            checkpoint = open_checkpoint(folder)
            layers = list(checkpoint.layers())
            self._members[name] = {
                "layers": layers,
                "inputs": load_ffn_inputs(folder),
                "stats": load_neuron_stats(folder),
                "teachers": best_teachers(folder, len(layers)),
            }
        return self._members[name]


def best_teachers(folder: Path, n_layers: int) -> list[dict[str, torch.Tensor]]:
    """Per layer: operating point key → assignment of the teacher with the lowest held-out rel_error on that layer."""
    teachers = load_teachers(folder)
    best: list[dict[str, tuple[float, str]]] = [{} for _ in range(n_layers)]
    for name, facts in teachers.items():
        key = point_key(facts["experts"], facts["active"], facts["shared"])
        for i, error in enumerate(facts["layers"]):
            if key not in best[i] or error < best[i][key][0]:
                best[i][key] = (error, name)
    partitions = {name: Partition.load(folder / facts["path"]) for name, facts in teachers.items()}
    return [{key: partitions[name].layers[i].assign.long() for key, (_, name) in layer.items()} for i, layer in enumerate(best)]


class ZooDataModule(L.LightningDataModule):
    """Train / val / test layer samples from a zoo folder (the manifest's split of each member)."""

    def __init__(self, zoo: str | Path, train_tokens: int = 1024, val_tokens: int = 1024, seed: int = 0, max_members: int | None = None):
        super().__init__()
        self.zoo, self.train_tokens, self.val_tokens, self.seed, self.max_members = Path(zoo), train_tokens, val_tokens, seed, max_members
        self.splits: dict[str, ZooLayers] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        rows = read_manifest(self.zoo)
        for split in ("train", "val", "test"):
            names = [row["name"] for row in rows if row["split"] == split][: self.max_members]
            if split != "test" and not names:
                raise MetanetError(f"zoo {self.zoo} has no {split} members; build it with `metanet zoo build` (val-seeds decide the val split)")
            self.splits[split] = ZooLayers(self.zoo, names, self.train_tokens, self.val_tokens, augment=split == "train", seed=self.seed)
        log.info("zoo layers: %s", {split: len(data) for split, data in self.splits.items()})

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits["train"], batch_size=None, shuffle=True, generator=generator, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=None, collate_fn=_identity)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=None, collate_fn=_identity)


def _identity(sample: LayerSample) -> LayerSample:
    return sample
