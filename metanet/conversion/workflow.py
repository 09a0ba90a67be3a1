"""The two jobs of `metanet convert` and `metanet plan`, callable from Python.

    prepared = prepare("SmolLM2-135M-Instruct", heldout_tokens=4096)      # model, corpus, held-out windows, dense outputs
    settings = conversion_settings(prepared.checkpoint, active_fraction=0.5)  # ConversionSettings' defaults otherwise
    result = convert_to_moe(prepared, settings, "moe/")                   # → result.quality["ppl_ratio"], result.partition

convert_to_moe   the pipeline's Partition (`convert_checkpoint`), the MoE checkpoint folder written from it
                 (`metanet.moe.checkpoint.apply`), then that folder loaded back and run on the held-out windows:
                 the quality reported is the written checkpoint's (its dtype included), next to the dense model's.
plan_blocks      per-block sensitivity for one or more methods (`measure_sensitivity`), fitted on the conversion's
                 calibration windows and measured on other calibration windows drawn with seed 1 (never the
                 held-out text), the plan of each under a budget (`make_plan`), and the modelled trade-off
                 curves (`pareto_curve`, `uniform_points`).

Held-out windows are those `eval` and `compare` measure on: the corpus's held-out documents
(`metanet.calib.split_documents`, seed 0), which no calibration window comes from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from metanet.calib import calibration_windows, load_corpus, load_model_and_tokenizer, split_documents, tokenize_documents
from metanet.calib.capture import ENCODER_FAMILIES
from metanet.checkpoints import Checkpoint, open_checkpoint
from metanet.conversion.pipeline import ConversionSettings, convert_checkpoint
from metanet.conversion.plan import Plan, make_plan, pareto_curve, uniform_points
from metanet.conversion.sensitivity import Sensitivity, measure_sensitivity
from metanet.device import resolve_device
from metanet.errors import MetanetError
from metanet.eval.model_quality import dense_reference, quality_of
from metanet.partition.make import resolve_router
from metanet.partition.partition import OperatingPoint, Partition

log = logging.getLogger(__name__)

#: Seed of the windows sensitivity is measured on (the conversion's own calibration uses the settings' seed, 0 by default).
SENSITIVITY_SEED = 1
#: Active counts measured by default, as shares of E (then rounded, kept between shared+1 and E−1).
DEFAULT_ACTIVE_SHARES = (1 / 8, 1 / 4, 1 / 2, 3 / 4)
#: `progress(description, total)` returns the function to call after each step of that work (as metanet.eval.speed).
Progress = Callable[[str, int | None], Callable[[], None]]


# -- settings ---------------------------------------------------------------------------
def operating_point(active_fraction: float, experts: int, shared: int = 0, width_multiple: int = 8) -> OperatingPoint:
    """The point running k = active_fraction · experts experts; MetanetError naming the nearest valid fractions unless
    k is an integer with shared < k ≤ experts."""
    if experts < 1 or shared < 0 or shared >= experts:
        raise MetanetError(f"--experts must be ≥ 1 and --shared between 0 and experts−1, got experts={experts}, shared={shared}")
    k = active_fraction * experts
    if math.isfinite(k) and abs(k - round(k)) < 1e-6 and shared < round(k) <= experts:
        return OperatingPoint(experts, round(k), shared, width_multiple)
    valid = range(shared + 1, experts + 1)
    below = [j for j in valid if j <= k] if math.isfinite(k) else []
    above = [j for j in valid if j >= k] if math.isfinite(k) else []
    nearest = sorted({*(below[-1:] or valid[:1]), *(above[:1] or valid[-1:])})
    raise MetanetError(
        f"--active-fraction {active_fraction:g} × {experts} experts = {k:g} active experts, not an integer between shared+1={shared + 1} "
        f"and {experts}; nearest valid fractions: {', '.join(f'{j / experts:g} (k={j})' for j in nearest)}")


def conversion_settings(
    checkpoint: Checkpoint,
    *,
    active_fraction: float | None = None,
    active: int | None = None,
    experts: int | None = None,
    shared: int | None = None,
    width_multiple: int = 8,
    plan: Plan | None = None,
    **overrides,
) -> ConversionSettings:
    """ConversionSettings for `checkpoint`: its defaults, with every override that is not None.

    The operating point: `active_fraction` (k = F·E) or `active` (k) of `experts` with `shared` always-active ones, each
    defaulting to ConversionSettings' point; or with a `plan`, the plan's per-block points (its method and router too,
    unless overridden), and then any of active_fraction / active / experts / shared that disagrees with the plan is a
    MetanetError, as is a plan for a model of another depth or width. Checked here, before any model is loaded.
    """
    defaults = ConversionSettings()
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if plan is not None:
        _check_plan(plan, checkpoint, active_fraction, active, experts, shared)
        points = plan.points(width_multiple)
        for point in points:
            point.expert_width(checkpoint.d_ff)
        overrides = {"method": plan.method or None, "router": plan.router or None, **overrides}
        settings = dataclasses.replace(defaults, point=plan.nominal_point(width_multiple), plan=points,
                                       **{key: value for key, value in overrides.items() if value is not None})
    else:
        experts = defaults.point.experts if experts is None else experts
        shared = defaults.point.shared if shared is None else shared
        if active is not None:
            point = OperatingPoint(experts, active, shared, width_multiple)
        else:
            fraction = defaults.point.active / defaults.point.experts if active_fraction is None else active_fraction
            point = operating_point(fraction, experts, shared, width_multiple)
        point.expert_width(checkpoint.d_ff)
        settings = dataclasses.replace(defaults, point=point, **overrides)
    resolve_router(settings.method, settings.router)  # unknown method or router: refused before any work
    if settings.calib_tokens < 1:
        raise MetanetError(f"--calib-tokens must be ≥ 1, got {settings.calib_tokens}")
    if settings.ridge < 0:
        raise MetanetError(f"--ridge must be ≥ 0, got {settings.ridge}")
    return settings


def load_plan(path: str | Path) -> Plan:
    """`Plan.load`, with a plan file that holds no block a MetanetError."""
    plan = Plan.load(path)
    if not plan.active:
        raise MetanetError(f"{path}: the plan has no blocks")
    return plan


def _check_plan(plan: Plan, checkpoint: Checkpoint, active_fraction, active, experts, shared) -> None:
    if len(plan.active) != checkpoint.n_layers:
        raise MetanetError(f"the plan has {len(plan.active)} blocks and this checkpoint {checkpoint.n_layers}: "
                           "it was made for another model; make one for this checkpoint with `metanet plan`")
    measured = plan.sensitivity.fingerprints if plan.sensitivity else []
    if measured and measured != [layer.fingerprint() for layer in checkpoint.layers()]:
        raise MetanetError("the plan was measured on another checkpoint (its blocks' weights differ); make one for this checkpoint with `metanet plan`")
    conflicts = [
        f"{name} {given:g} (the plan's: {own:g})"
        for name, given, own in (("--experts", experts, plan.experts), ("--shared", shared, plan.shared),
                                 ("--active-fraction", active_fraction, plan.active_fraction))
        if given is not None and abs(given - own) > 1e-6
    ]
    if active is not None:
        conflicts.append(f"--active {active} (the plan sets k per block: {min(plan.active)}–{max(plan.active)})")
    if conflicts:
        raise MetanetError(f"--plan sets the operating point of every block; drop {', '.join(conflicts)}")


# -- inputs -----------------------------------------------------------------------------
@dataclass
class Prepared:
    """A checkpoint with its dense model loaded, the corpus, and the held-out windows with the dense model's outputs on them."""

    checkpoint: Checkpoint
    model: torch.nn.Module  # dense, eval mode, on `device`
    tokenizer: object
    corpus: list[str] | None  # documents; None when nothing reads text
    heldout: torch.LongTensor | None  # [N, S] held-out windows (CPU); None without held-out tokens
    reference: torch.Tensor | None  # dense_reference on them: per-window NLL [N] or embeddings [N, d]
    device: torch.device

    @property
    def family(self) -> str:
        return self.checkpoint.family.name


def prepare(checkpoint: str | Checkpoint, corpus: str | None = None, heldout_tokens: int = 4096, device: str = "cpu",
            read_corpus: bool = True, seq_len: int = 128) -> Prepared:
    """Open the checkpoint, read the corpus (`load_corpus`: a path or a named corpus; skipped when not `read_corpus`),
    load the dense model onto `device` (auto | cpu | cuda), cut `heldout_tokens` of held-out windows (0: none) and
    run the dense model on them. Bad input fails here, before any conversion work."""
    checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    target = resolve_device(device)
    if heldout_tokens < 0:
        raise MetanetError(f"--heldout-tokens must be ≥ 0, got {heldout_tokens}")
    docs = load_corpus(corpus) if read_corpus or heldout_tokens else None
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    model = model.to(target)
    heldout = reference = None
    if heldout_tokens:
        heldout = tokenize_documents(tokenizer, split_documents(docs, seed=0)[1], heldout_tokens, seq_len=seq_len, seed=0)
        reference = dense_reference(model, checkpoint.family.name, heldout.to(target))
    return Prepared(checkpoint, model, tokenizer, docs, heldout, reference, target)


# -- convert ----------------------------------------------------------------------------
@dataclass
class ConversionResult:
    partition: Partition
    out: Path
    written: dict  # apply's summary (files, size_mb, write_s, …)
    quality: dict[str, float]  # causal LMs: dense_ppl, moe_ppl, ppl_ratio; encoders: embedding_cosine
    heldout_tokens: int

    def metrics(self) -> dict[str, float]:
        """The numbers of the run, flat: quality first, then cost."""
        info = self.partition.info
        return {**self.quality, "active_fraction": self.partition.active_fraction(), "convert_s": info["convert_s"],
                "calib_tokens": info["calib_tokens"], "heldout_tokens": self.heldout_tokens, "size_mb": self.written["size_mb"]}


def convert_to_moe(prepared: Prepared, settings: ConversionSettings, out: str | Path, dtype: torch.dtype | None = None,
                   metanetwork=None, progress: Progress | None = None, out_format: str = "metanet") -> ConversionResult:
    """Convert `prepared.checkpoint` with `settings`, write the MoE checkpoint folder `out` (an earlier MoE checkpoint
    there is replaced; anything else there is refused before the conversion starts) and measure it on the held-out
    windows (module docstring). `dtype` casts the written experts and dense tensors (None: the source's).
    `out_format` "transformers" writes the GLM-4-MoE folder of metanet.moe.export_transformers instead (what it cannot
    express, compensation's output bias included, is refused before the conversion starts) and measures that folder
    as plain transformers loads it."""
    from metanet.moe import export_transformers as export
    from metanet.moe.checkpoint import apply, check_destination, load

    checkpoint, out = prepared.checkpoint, Path(out)
    if prepared.heldout is None:
        raise MetanetError("convert measures the MoE on held-out text: prepare it with heldout_tokens ≥ 1")
    if out_format == "transformers":
        check_transformers_export(checkpoint, settings)
        export.check_destination(checkpoint, out)
    else:
        check_destination(checkpoint, out)
    step = progress or (lambda description, total: lambda: None)
    partition = convert_checkpoint(checkpoint, settings, prepared.model, prepared.tokenizer, prepared.corpus, metanetwork,
                                   prepared.device, progress=step(f"{settings.method} conversion, block by block", checkpoint.n_layers))
    if out_format == "transformers":
        from transformers import AutoModelForCausalLM

        written = export.export_transformers(checkpoint, partition, out, dtype, progress=step(f"writing {export.ARCHITECTURE} blocks", checkpoint.n_layers))
        advance = step("held-out text through the exported model", None)
        moe = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).to(prepared.device).eval()
    else:
        written = apply(checkpoint, partition, out, dtype, progress=step("writing expert layers", checkpoint.n_layers))
        advance = step("held-out text through the MoE checkpoint", None)
        moe = load(out, device=prepared.device)
    outputs = dense_reference(moe, prepared.family, prepared.heldout)
    advance()
    quality = quality_of(prepared.family, outputs, prepared.reference)
    if prepared.family not in ENCODER_FAMILIES:
        quality = {"dense_ppl": math.exp(prepared.reference.float().mean().item()), "moe_ppl": math.exp(outputs.float().mean().item()), **quality}
    log.info("converted %s into %s: %s", checkpoint.path.name, out, ", ".join(f"{k} {v:.4g}" for k, v in quality.items()))
    return ConversionResult(partition, out, written, quality, prepared.heldout.numel())


def check_transformers_export(checkpoint: Checkpoint, settings: ConversionSettings) -> None:
    """What `convert --format transformers` refuses before converting (one-line MetanetError): a source GLM-4-MoE
    cannot express, and compensation with an output bias (its MLPs have none). Any plan is expressible (zero experts
    pad its blocks to one size: metanet.moe.export_transformers)."""
    from metanet.moe import export_transformers as export

    export.check_source(checkpoint.config, checkpoint.family.name, checkpoint.path.name)
    if settings.compensate and settings.output_bias:
        raise MetanetError(f"--format transformers cannot hold compensation's output bias ({export.ARCHITECTURE}'s MLPs have none): "
                           "compensate with --no-output-bias (the default with this format) or --no-compensate")


def partition_json(partition: Partition, folder: str | Path) -> Path:
    """partition.json of `partition` written into `folder` (e.g. to log it; the tensors are in the MoE checkpoint)."""
    with tempfile.TemporaryDirectory() as tmp:
        partition.save(Path(tmp) / "partition")
        target = Path(folder) / "partition.json"
        target.write_text((Path(tmp) / "partition" / "partition.json").read_text())
    return target


# -- plan -------------------------------------------------------------------------------
def default_actives(experts: int, shared: int = 0) -> list[int]:
    """The active counts sensitivity is measured at by default: DEFAULT_ACTIVE_SHARES of E, between shared+1 and E−1."""
    return sorted({k for k in (max(1, round(share * experts)) for share in DEFAULT_ACTIVE_SHARES) if shared < k < experts})


def plan_settings(checkpoint: Checkpoint, *, experts: int | None = None, shared: int | None = None, actives: list[int] | None = None,
                  width_multiple: int = 8, **overrides) -> tuple[ConversionSettings, list[int]]:
    """(ConversionSettings to measure sensitivity with, the active counts to measure): `experts` and `shared` default to
    ConversionSettings' point, `actives` to `default_actives`; the settings' point runs the largest of them."""
    defaults = ConversionSettings().point
    experts = defaults.experts if experts is None else experts
    shared = defaults.shared if shared is None else shared
    actives = sorted(set(actives)) if actives else default_actives(experts, shared)
    if not actives or actives[0] <= shared or actives[-1] >= experts:
        raise MetanetError(f"--actives must lie between shared+1={shared + 1} and E−1={experts - 1}, got {','.join(map(str, actives)) or 'none'}")
    settings = conversion_settings(checkpoint, active=actives[-1], experts=experts, shared=shared, width_multiple=width_multiple, **overrides)
    return settings, actives


@dataclass
class PlanResult:
    plans: dict[str, Plan]  # method → its plan, in the order asked (the first is the one to convert with)
    sensitivities: dict[str, Sensitivity]
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # method → pareto_curve
    uniform: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # method → uniform_points

    @property
    def plan(self) -> Plan:
        return next(iter(self.plans.values()))


def check_plan_request(checkpoint: Checkpoint, settings: ConversionSettings, methods: list[str], actives: list[int],
                       active_fraction: float | None, max_ppl_ratio: float | None) -> None:
    """Everything `plan_blocks` would refuse, checked before any model is loaded."""
    if checkpoint.family.name in ENCODER_FAMILIES:
        raise MetanetError(f"plan measures perplexity: it needs a causal LM, not an encoder ({checkpoint.family.name}); "
                           "encoders convert at one operating point (`metanet convert --active-fraction F`)")
    if (active_fraction is None) == (max_ppl_ratio is None):
        raise MetanetError("give exactly one of --active-fraction and --max-ppl-ratio")
    if active_fraction is not None and not 0 < active_fraction <= 1:
        raise MetanetError(f"--active-fraction must be in (0, 1], got {active_fraction:g}")
    if max_ppl_ratio is not None and not max_ppl_ratio >= 1:
        raise MetanetError(f"--max-ppl-ratio must be ≥ 1 (1 is the dense model), got {max_ppl_ratio:g}")
    if not methods:
        raise MetanetError("--methods names no method")
    for method in methods:
        resolve_router(method, settings.router)
    experts, shared = settings.point.experts, settings.point.shared
    if not actives or min(actives) <= shared or max(actives) >= experts:
        raise MetanetError(f"--actives must lie between shared+1={shared + 1} and E−1={experts - 1}, got {','.join(map(str, actives)) or 'none'}")
    for k in actives:
        OperatingPoint(experts, k, shared, settings.point.width_multiple).expert_width(checkpoint.d_ff)


def plan_blocks(prepared: Prepared, settings: ConversionSettings, methods: list[str], actives: list[int], tokens: int = 4096,
                active_fraction: float | None = None, max_ppl_ratio: float | None = None, metanetwork=None,
                progress: Progress | None = None) -> PlanResult:
    """Measure every block's sensitivity with each method (settings' router, shared experts, refinement, compensation and
    ridge), fitted on the conversion's own calibration windows (settings.calib_tokens of settings.calibration, settings.seed)
    and measured on `tokens` other calibration tokens drawn with SENSITIVITY_SEED, and plan each under the budget
    (exactly one of `active_fraction`, `max_ppl_ratio`)."""
    check_plan_request(prepared.checkpoint, settings, methods, actives, active_fraction, max_ppl_ratio)
    if settings.seed == SENSITIVITY_SEED:
        raise MetanetError(f"--seed {SENSITIVITY_SEED} draws the windows sensitivity is measured on; choose another seed")
    step = progress or (lambda description, total: lambda: None)
    advance = step(f"{settings.calibration} windows for sensitivity", None)
    draw = lambda n, seed: calibration_windows(prepared.model, prepared.tokenizer, prepared.family, n, prepared.corpus,  # noqa: E731
                                               settings.calibration, seed, progress=lambda n=1: advance())
    fit_windows, windows = draw(settings.calib_tokens, settings.seed), draw(tokens, SENSITIVITY_SEED)
    point = OperatingPoint(settings.point.experts, max(actives), settings.point.shared, settings.point.width_multiple)
    result = PlanResult({}, {})
    for method in methods:
        method_settings = dataclasses.replace(settings, method=method, point=point, plan=None)
        router = resolve_router(method, settings.router)
        sensitivity = measure_sensitivity(prepared.checkpoint, prepared.model, fit_windows, windows, method_settings, actives, metanetwork,
                                          progress=step(f"sensitivity of {method}/{router}: every block at k={','.join(map(str, sorted(set(actives))))}",
                                                        prepared.checkpoint.n_layers))
        result.sensitivities[method] = sensitivity
        result.plans[method] = make_plan(sensitivity, active_fraction, max_ppl_ratio, method, router)
        result.curves[method] = pareto_curve(sensitivity)
        result.uniform[method] = uniform_points(sensitivity)
    return result
