"""Distillation maths for healing an MoE model toward its dense teacher, and the LightningModule that runs it.

Loss on a batch of token windows (student = the MoE model, teacher = the dense checkpoint):

    L = w_out · L_out  +  w_ffn · L_ffn  +  w_bal · L_bal

    L_out  causal LMs: KL(p_teacher ‖ p_student) of the next-token distributions, mean over positions
           encoders:   1 − cos(e_s, e_t) + ‖e_s − e_t‖² / ‖e_t‖², e = mean-pooled last hidden state
    L_ffn  mean over layers i of ‖Y_t,i − Y_s,i‖²_F / ‖Y_t,i‖²_F: block i's FFN output in the teacher
           vs the MoEFFN's output in the student, each on its own model's FFN input
    L_bal  mean over layers of the switch-style balance E_r · Σ_e f_e · p̄_e over the routed experts

Top-k routing has no gradient with respect to the router (an MoEFFN sums the selected experts
unweighted). The router is trained through a straight-through term added to each MoEFFN output,
exactly zero in value (`router_surrogate`), so the healed model computes the MoE function it will
be saved as, while the router gets a gradient for every expert near the top-k boundary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from metanet.calib.capture import ENCODER_FAMILIES, capture_ffn_inputs, ffn_input_modules
from metanet.checkpoints import ACTIVATIONS
from metanet.errors import MetanetError
from metanet.eval.model_quality import dense_reference
from metanet.heal.settings import TRAIN_MODES, HealSettings
from metanet.moe.convert import dense_ffn_layers
from metanet.moe.module import MoEFFN
from metanet.partition.partition import OperatingPoint

log = logging.getLogger(__name__)

ROUTER_ATTRS = ("router_weight", "router_bias")
LOG_EVERY = 10  # optimizer steps between training-loss points in MLflow
EVAL_CHUNK = 4096  # held-out tokens per MoEFFN call when measuring rel_error
#: Families whose `ffn_input_modules` module is the whole FFN (its output is the FFNLayer's output, b_out included):
#: the teacher's FFN outputs are taken from its forward pass instead of computed a second time.
WHOLE_FFN_MODULE = ("gpt2", "gpt_neox", "llama")


# -- the pieces of the loss ---------------------------------------------------------------------
def set_trainable(model: torch.nn.Module, train: str) -> list[str]:
    """requires_grad True for the MoEFFN tensors `train` names, False for every other parameter;
    returns the names of the trainable ones (routers: router_weight/bias; routers+experts: every MoEFFN parameter)."""
    if train not in TRAIN_MODES:
        raise MetanetError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {train!r}")
    model.requires_grad_(False)
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, MoEFFN):
            for attr, parameter in module.named_parameters(recurse=False):
                if train == "routers+experts" or attr in ROUTER_ATTRS:
                    parameter.requires_grad_(True)
                    names.append(f"{prefix}.{attr}")
    if not names:
        raise MetanetError("the student has no MoEFFN layer to heal")
    return names


def expert_outputs(module: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Every expert's output y_e(x) = W_out[e] · (act(W_in[e]·x + b_in[e]) [⊙ W_gate[e]·x]).   x: [T, d] → [T, E, d]

    Pad neurons (appended after each expert's real ones, zero weights) are left out of the products.
    """
    m = int((module.order[: module.expert_width] >= 0).sum())  # real width: expert 0's non-pad neurons
    x = x.to(module.w_in.dtype)
    h = torch.einsum("td,emd->tem", x, module.w_in[:, :m])  # [T, E, m]
    if module.b_in is not None:
        h = h + module.b_in[:, :m]
    h = ACTIVATIONS[module.activation](h)
    if module.w_gate is not None:
        h = h * torch.einsum("td,emd->tem", x, module.w_gate[:, :m])
    return torch.einsum("tem,edm->ted", h, module.w_out[:, :, :m])  # [T, E, d]


def router_surrogate(module: MoEFFN, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Straight-through router gradient, zero in value.   x: [T, d], scores: [T, E] (module.scores(x)) → [T, d]

        c(x) = Σ_{e routed} (σ_e − sg[σ_e]) · sg[y_e(x)],   σ_e = sigmoid((s_e − θ) / τ)

    θ = midpoint between the (k−s)-th and (k−s+1)-th highest routed score, τ = standard deviation
    of the token's routed scores (both without gradient), sg = stop-gradient. Added to the MoE
    output it changes no value, and gives ∂L/∂s_e = ⟨∂L/∂y, y_e(x)⟩ · σ'_e: what switching expert
    e on or off would do to the loss, weighted by how close e is to the top-k boundary.
    Zero when routing is fixed (no routed expert active, or all of them).
    """
    point = module.point
    shared, k, routed_experts = point.shared, point.routed_active, point.routed
    if k < 1 or k >= routed_experts:
        return torch.zeros_like(x)
    routed = scores[:, shared:]  # [T, E_r]
    with torch.no_grad():
        top = routed.topk(k + 1, dim=1).values  # [T, k+1]
        theta = (top[:, k - 1] + top[:, k]) / 2  # [T]
        tau = routed.std(dim=1).clamp_min(1e-6)  # [T]
        y = expert_outputs(module, x)[:, shared:].float()  # [T, E_r, d]
    sigma = torch.sigmoid((routed - theta[:, None]) / tau[:, None])  # [T, E_r]
    return torch.einsum("te,ted->td", sigma - sigma.detach(), y).to(x.dtype)


def balance_loss(scores: torch.Tensor, point: OperatingPoint) -> torch.Tensor:
    """Switch-Transformer load balance over the routed experts: E_r · Σ_e f_e · p̄_e.   scores: [T, E] → scalar

    f_e = share of the T·(k−s) routed selections that went to e (no gradient); p̄_e = mean over
    tokens of softmax(routed scores)_e. It is 1 for perfectly uniform routing, larger when skewed.
    """
    routed, k = scores[:, point.shared:], point.routed_active  # [T, E_r]
    if k < 1 or routed.shape[1] < 2:
        return scores.new_zeros(())
    chosen = routed.topk(k, dim=1).indices  # [T, k]
    f = torch.bincount(chosen.flatten(), minlength=routed.shape[1]).float() / chosen.numel()  # [E_r]
    p = routed.softmax(dim=1).mean(dim=0)  # [E_r]
    return routed.shape[1] * (f * p).sum()


def relative_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖target − prediction‖²_F / ‖target‖²_F in float32."""
    target = target.float()
    return (prediction.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) per position, mean over positions.   logits: [B, S, V] → scalar"""
    student = student_logits.float().log_softmax(dim=-1).flatten(0, 1)  # [B·S, V]
    teacher = teacher_logits.float().log_softmax(dim=-1).flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 − cos(e_s, e_t), mean over the batch, + ‖e_s − e_t‖² / ‖e_t‖².   embeddings: [B, d] → scalar"""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean() + relative_error(student, teacher)


@contextlib.contextmanager
def _hooked(modules: list[torch.nn.Module], hook, pre: bool = False) -> Iterator[None]:
    """`hook` on every module for the duration of the block (forward pre-hook when `pre`)."""
    handles = [(m.register_forward_pre_hook(hook) if pre else m.register_forward_hook(hook)) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- the LightningModule --------------------------------------------------------------------------
class HealModule(pl.LightningModule):
    """Distils `student` (an MoE model, every FFN an MoEFFN) from the dense `teacher` (module docstring).

    Only the tensors `settings.train` names are trained; every other student tensor and the whole
    teacher are frozen. Held-out quality is measured before healing, every `eval_every` training
    tokens and at the last step, into `history` and MLflow (step = training tokens seen).
    Lightning checkpoints hold the trainable tensors only (the rest is read again from the MoE
    checkpoint on resume), plus the tokens seen and the history.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, family: str, settings: HealSettings, heldout_ids: torch.LongTensor):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.family, self.settings = family, settings
        self.encoder = family in ENCODER_FAMILIES
        self.quality_key = "embedding_cosine" if self.encoder else "ppl_ratio"
        self.trainable = {f"student.{name}" for name in set_trainable(student, settings.train)}
        teacher.requires_grad_(False)
        self.moe_modules = sorted((m for m in student.modules() if isinstance(m, MoEFFN)), key=lambda m: m.index)
        self.heldout_ids = heldout_ids  # [N, S], moved to the device when used
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.tokens_seen = 0
        self.resumed_from = 0  # tokens_seen of the resume point, 0 for a fresh run
        self.history: list[dict] = []
        self._reference = None  # teacher's held-out outputs and FFN inputs, computed once
        self._step_start = 0.0
        self._losses: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        """Lightning switches the module to training mode; both models stay in eval mode (no dropout):
        the student is fitted to the deterministic function of the teacher."""
        super().train(mode)
        self.student.eval()
        self.teacher.eval()
        return self

    def on_fit_start(self) -> None:
        # After Lightning moved the models to their device: views of the teacher's FFN weights there.
        self.teacher_layers = dense_ffn_layers(self.teacher, self.family)
        self.teacher_inputs = ffn_input_modules(self.teacher, self.family)

    def on_train_start(self) -> None:
        if not self.history:  # a resumed run has its "before" point already
            self._evaluate()

    # -- training --------------------------------------------------------------------------------
    def _output(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, S, V] (causal LMs) or mean-pooled embeddings [B, d] (encoders)."""
        if self.encoder:
            return model(input_ids=ids).last_hidden_state.mean(dim=1)
        return model(input_ids=ids, use_cache=False).logits

    def training_step(self, batch, batch_idx):
        ids = batch[0]  # [B, S]
        teacher_x: list[torch.Tensor] = []
        teacher_y: list[torch.Tensor] = []

        def teacher_hook(module, args, output) -> None:  # returns None: the output stays as it is
            teacher_x.append(args[0])
            teacher_y.append(output)

        with torch.no_grad(), _hooked(self.teacher_inputs, teacher_hook):
            teacher_out = self._output(self.teacher, ids)
            if self.family not in WHOLE_FFN_MODULE:  # the hooked module is part of the FFN: compute the whole FFN's output
                teacher_y = [layer.forward(x) for layer, x in zip(self.teacher_layers, teacher_x)]  # each [B, S, d]

        student_y: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []

        def moe_hook(module: MoEFFN, args, output):
            x = args[0].reshape(-1, module.d_model)  # [T, d]
            s = module.scores(x)  # [T, E] float32, differentiable in the router
            scores.append(s)
            output = output + router_surrogate(module, x, s).reshape(output.shape).to(output.dtype)
            student_y.append(output)
            return output

        with _hooked(self.moe_modules, moe_hook):
            student_out = self._output(self.student, ids)

        loss_out = embedding_loss(student_out, teacher_out) if self.encoder else kl_loss(student_out, teacher_out)
        loss_ffn = torch.stack([relative_error(ys, yt) for ys, yt in zip(student_y, teacher_y)]).mean()
        loss_bal = torch.stack([balance_loss(s, m.point) for s, m in zip(scores, self.moe_modules)]).mean()
        s = self.settings
        loss = s.output_weight * loss_out + s.ffn_weight * loss_ffn + s.balance_weight * loss_bal
        self.tokens_seen += ids.numel()
        self._losses = {"loss": loss.detach(), "loss_output": loss_out.detach(), "loss_ffn": loss_ffn.detach(), "loss_balance": loss_bal.detach()}
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.settings.lr, weight_decay=0.0)
        warmup = self.settings.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        tokens_per_s = batch[0].numel() / max(time.perf_counter() - self._step_start, 1e-9)
        self.log("tok/s", tokens_per_s, prog_bar=True, logger=False)
        if self.logger is not None and self.global_step % LOG_EVERY == 0:
            self.logger.log_metrics({**{k: v.item() for k, v in self._losses.items()}, "tokens_per_s": tokens_per_s}, step=self.tokens_seen)
        every = self.settings.eval_every
        if self.tokens_seen // every > self.history[-1]["tokens"] // every or self.global_step >= self.trainer.max_steps:
            self._evaluate()
        self.log(self.quality_key, self.history[-1][self.quality_key], prog_bar=True, logger=False)

    # -- held-out metrics ----------------------------------------------------------------------
    @torch.no_grad()
    def heldout_metrics(self) -> dict[str, float]:
        """{quality_key: …, "rel_error": …} on the held-out windows.

        ppl_ratio = exp(mean NLL_student − mean NLL_teacher); embedding_cosine = mean cos(e_s, e_t)
        (metanet.eval.model_quality). rel_error: per layer ‖Y − Ŷ‖_F / ‖Y‖_F over all held-out tokens,
        Y the teacher's FFN output and Ŷ the MoEFFN's on the teacher's FFN input X (DESIGN.md), mean over layers.
        """
        ids = self.heldout_ids.to(self.device)
        batch = self.settings.batch_size
        if self._reference is None:
            self._reference = (dense_reference(self.teacher, self.family, ids, batch), capture_ffn_inputs(self.teacher, self.family, ids, batch).layers)
        reference, inputs = self._reference
        student = dense_reference(self.student, self.family, ids, batch)
        if self.encoder:
            quality = F.cosine_similarity(student, reference, dim=1).mean().item()
        else:
            quality = math.exp(student.mean().item() - reference.mean().item())
        errors = []
        for layer, module in zip(self.teacher_layers, self.moe_modules):
            num = den = 0.0
            for x in inputs[layer.index].split(EVAL_CHUNK):  # [≤EVAL_CHUNK, d] on the CPU
                x = x.to(self.device, layer.w_in.dtype)
                y = layer.forward(x).float()
                num += (y - module(x.to(module.w_in.dtype)).float()).pow(2).sum().item()
                den += y.pow(2).sum().item()
            errors.append(math.sqrt(num / max(den, 1e-30)))
        return {self.quality_key: quality, "rel_error": sum(errors) / len(errors)}

    def _evaluate(self) -> None:
        metrics = self.heldout_metrics()
        self.history.append({"tokens": self.tokens_seen, **metrics})
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=self.tokens_seen)
        log.info("%d tokens: %s %.4f, rel_error %.4f", self.tokens_seen, self.quality_key, metrics[self.quality_key], metrics["rel_error"])

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {name: t for name, t in checkpoint["state_dict"].items() if name in self.trainable}
        checkpoint["healing"] = {"tokens_seen": self.tokens_seen, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = self.trainable - set(checkpoint["state_dict"])
        if missing or "healing" not in checkpoint:
            raise MetanetError(f"the resume checkpoint does not match this healing run (missing {len(missing)} trainable tensors, e.g. {sorted(missing)[:1]})")
        self.tokens_seen = self.resumed_from = checkpoint["healing"]["tokens_seen"]
        self.history = checkpoint["healing"]["history"]


class ResumePoint(pl.Callback):
    """Saves the Lightning checkpoint to `path` every `every` optimizer steps, and when training stops on an
    exception (Ctrl-C included) after it made progress; written to a temporary file, then renamed."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every
        self.start_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.start_step is not None and trainer.global_step > self.start_step:
            self.save(trainer)
            log.warning("healing stopped after %d tokens; continue with --resume", pl_module.tokens_seen)

    def save(self, trainer) -> None:
        tmp = self.path.with_suffix(".tmp")
        trainer.save_checkpoint(tmp)
        os.replace(tmp, self.path)
