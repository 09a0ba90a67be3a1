"""The metanetwork's training maths as a LightningModule (data: training.metanet_data).

Each step takes one zoo layer and an operating point drawn from the configured ones (E from
`experts` where E splits the layer, k = E·`active_ratio`, shared experts with probability
`shared_probability`), and minimises, all terms label-invariant (metanet.model.soft):

    loss = w_rec · ‖Y − Y_moe‖²/‖Y‖²        functional reconstruction through the soft assignment and
                                             the soft top-k of the predicted router (fitted on
                                             `synthetic_tokens` synthetic inputs)
         + w_teacher · ‖PPᵀ − TTᵀ‖²/f²       co-membership agreement with the layer's best teacher
                                             (only at the teacher operating points)
         + w_load · CV²(router load)         balance of the routed experts' load
         + w_importance · importance_loss    which neurons carry the most output mass (shared experts)

With `straight_through` (default) the partition and the gates take the hard values the prediction
uses, with the relaxations' gradients, so the reconstruction term is the hard rel_error² on the
training tokens. With probability `stats_probability` the layer's neuron statistics are given (data-aware mode),
else not (data-free mode), so one model serves both. Validation predicts hard partitions at
E=16, k=4 in data-free mode and measures rel_error on held-back tokens next to the `kmeans`
partition with the `scaled` router (the best data-free baseline pair) on the same tokens.
"""

from __future__ import annotations

import random

import lightning as L
import torch

from metanet.errors import MetanetError
from metanet.eval.metrics import layer_metrics
from metanet.model import MetaNetConfig, MetaNetwork
from metanet.model.soft import co_membership_loss, importance_loss, load_loss, soft_moe, soft_partition
from metanet.partition import OperatingPoint
from metanet.partition.methods import assign_neurons
from metanet.partition.partition import LayerPartition
from metanet.partition.routers import fit_router
from metanet.partition.shared import split_shared
from training.metanet_data import LayerSample, point_key

VAL_POINT = OperatingPoint(16, 4, 0)


class MetaNetModule(L.LightningModule):
    def __init__(
        self,
        network: dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        loss_weights: dict | None = None,
        experts: tuple[int, ...] = (8, 16, 32),
        active_ratio: float = 0.25,
        shared_probability: float = 0.3,
        stats_probability: float = 0.5,
        assign_tau: float = 0.05,
        route_tau: float = 0.1,
        synthetic_tokens: int = 1024,
        straight_through: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = MetaNetwork(MetaNetConfig(**(network or {})))
        self.weights = {"reconstruction": 1.0, "teacher": 0.0, "load": 0.01, "importance": 0.1, **(loss_weights or {})}
        self.rng = random.Random(seed)

    def sample_point(self, d_ff: int) -> OperatingPoint:
        """A random operating point that splits this layer into experts of width a multiple of 8."""
        choices = [e for e in self.hparams.experts if d_ff % e == 0 and (d_ff // e) % 8 == 0]
        if not choices:
            raise MetanetError(f"none of the expert counts {self.hparams.experts} splits d_ff={d_ff} into experts of a width that is a multiple of 8")
        experts = self.rng.choice(choices)
        active = max(1, round(experts * self.hparams.active_ratio))
        shared = 2 if experts >= 8 and active > 2 and self.rng.random() < self.hparams.shared_probability else 0
        return OperatingPoint(experts, active, shared)

    def losses(self, sample: LayerSample, point: OperatingPoint, with_stats: bool) -> dict[str, torch.Tensor]:
        layer, f = sample.layer, sample.layer.d_ff
        m = point.expert_width(f)
        out = self.net.neuron_outputs(layer, sample.stats if with_stats else None)
        shared, routed = split_shared(out.importance, point.shared * m)
        p = torch.zeros(f, point.experts, dtype=out.space.dtype, device=out.space.device)  # [f, E]
        p[shared, torch.arange(point.shared, device=p.device).repeat_interleave(m)] = 1.0
        p[routed, point.shared :] = soft_partition(out.space[routed], point.routed, m, self.hparams.assign_tau,
                                                      straight_through=self.hparams.straight_through)
        y, y_moe, gates = soft_moe(layer, sample.x, p, out, point, self.hparams.route_tau, self.hparams.synthetic_tokens,
                                   self.hparams.straight_through)
        losses = {
            "reconstruction": (y - y_moe).pow(2).sum() / y.pow(2).sum(),
            "load": load_loss(gates, point),
            "importance": importance_loss(out.importance, layer, sample.x),
        }
        teacher = sample.teachers.get(point_key(point.experts, point.active, point.shared))
        if teacher is not None:
            losses["teacher"] = co_membership_loss(p, teacher)
        return losses

    def training_step(self, sample: LayerSample, batch_idx: int) -> torch.Tensor:
        point = self.sample_point(sample.layer.d_ff)
        losses = self.losses(sample, point, with_stats=self.rng.random() < self.hparams.stats_probability)
        total = sum(self.weights[name] * value for name, value in losses.items())
        for name, value in losses.items():
            self.log(f"train_{name}", value, batch_size=1, on_epoch=True)
        self.log("train_loss", total, batch_size=1, prog_bar=True, on_epoch=True)
        return total

    def validation_step(self, sample: LayerSample, batch_idx: int) -> None:
        metrics = self.layer_rel_errors(sample, VAL_POINT)
        for name, value in metrics.items():
            self.log(f"val_{name}", value, batch_size=1, prog_bar=name == "rel_error")

    def layer_rel_errors(self, sample: LayerSample, point: OperatingPoint) -> dict[str, float]:
        """Held-back rel_error of the data-free prediction, its oracle routing, and the kmeans/scaled baseline."""
        prediction = layer_metrics(sample.layer, self.net.predict(sample.layer, point), point, sample.x_val)
        kmeans = assign_neurons("kmeans", sample.layer, point)
        baseline = LayerPartition(kmeans, *fit_router("scaled", sample.layer, kmeans, point))
        return {
            "rel_error": prediction["rel_error"],
            "oracle_rel_error": prediction["oracle_rel_error"],
            "kmeans_rel_error": layer_metrics(sample.layer, baseline, point, sample.x_val)["rel_error"],
        }

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
