"""Side-by-side evaluation of partition methods and routers on one checkpoint.

Every (method, router, seed) is one row of `evaluate`'s report; `aggregate` folds the
seeds into mean and spread; `markdown_table` renders the result. Calibration and
held-out text are prepared once and shared by all rows.

With a conversion technique on (sequential calibration, coverage refinement, compensation:
metanet.conversion), each row is converted on its own by `convert_checkpoint` with those
settings (its calibration windows drawn by the pipeline, with the row's seed) instead of
`make_partitions`; every row records its technique.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Callable

from metanet.calib import calibration_split, load_corpus, load_model_and_tokenizer, text_split
from metanet.checkpoints import Checkpoint
from metanet.conversion.compensate import DEFAULT_RIDGE
from metanet.conversion.pipeline import ConversionSettings, convert_checkpoint
from metanet.eval.evaluate import evaluate
from metanet.eval.metrics import METRICS
from metanet.eval.model_quality import dense_reference
from metanet.partition.make import make_partitions, needs_calibration, resolve_router
from metanet.partition.methods import layer_calibrations
from metanet.partition.partition import OperatingPoint

log = logging.getLogger(__name__)

#: Columns of the comparison, in order: the layer-mean metrics, whole-model quality, cost.
QUALITY = ("ppl_ratio", "embedding_cosine")
COLUMNS = METRICS + QUALITY + ("convert_s", "calib_tokens")


@dataclass
class CompareSettings:
    methods: list[str]
    point: OperatingPoint
    routers: list[str] | None = None  # None: each method's own router; else every listed router for every method
    seeds: list[int] = field(default_factory=lambda: [0])
    corpus: str | None = None
    calibration: str = "text"  # calibration windows: the corpus's ("text"), the model's own ("generated") or half of each ("mix"); held-out is always text
    calib_tokens: int = 4096
    heldout_tokens: int = 4096
    model_quality: bool = True
    metanetwork: object = None  # MetaNetwork for the metanet methods and router; None: the shipped one
    sequential: bool = False  # conversion techniques (metanet.conversion.pipeline); all off: make_partitions, the baseline
    refine: bool = False
    compensate: bool = False
    ridge: float = DEFAULT_RIDGE

    @property
    def converts(self) -> bool:
        """Whether rows go through the conversion pipeline (some technique is on)."""
        return self.sequential or self.refine or self.compensate

    def technique(self) -> str:
        """The row label of the techniques: "none", or e.g. "sequential+refine+compensate(ridge=0.1)"."""
        names = [name for name in ("sequential", "refine", "compensate") if getattr(self, name)]
        label = "+".join(names) or "none"
        return f"{label}(ridge={self.ridge:g})" if self.compensate else label

    def conversion(self, method: str, router: str, seed: int) -> ConversionSettings:
        return ConversionSettings(method=method, router=router, point=self.point, calibration=self.calibration, calib_tokens=self.calib_tokens,
                                  sequential=self.sequential, refine=self.refine, compensate=self.compensate, ridge=self.ridge, seed=seed)


def compare(checkpoint: Checkpoint, settings: CompareSettings, progress: Callable[[str], None] | None = None) -> list[dict]:
    """One evaluate() report per (method, router, seed); `progress` receives a line per row."""
    settings.point.expert_width(checkpoint.d_ff)  # fail before any work on a bad operating point
    routers_of = {m: settings.routers or [resolve_router(m, None)] for m in settings.methods}
    for method, routers in routers_of.items():
        for router in routers:
            resolve_router(method, router)
    corpus = load_corpus(settings.corpus)
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    family = checkpoint.family.name
    heldout = text_split(model, tokenizer, family, "heldout", settings.heldout_tokens, corpus)
    reference = dense_reference(model, family, heldout.input_ids) if settings.model_quality else None
    rows = []
    technique = settings.technique()
    for seed in settings.seeds:
        calibration, calib_split = None, None
        if not settings.converts and any(needs_calibration(m, routers_of[m]) for m in settings.methods):
            calib_split = calibration_split(model, tokenizer, family, settings.calib_tokens, corpus, settings.calibration, seed)
            calibration = layer_calibrations(checkpoint.layers(), calib_split.ffn_inputs.layers)
        for method in settings.methods:
            if settings.converts:
                partitions = {router: convert_checkpoint(checkpoint, settings.conversion(method, router, seed), model, tokenizer, corpus,
                                                         settings.metanetwork)
                              for router in (resolve_router(method, r) for r in routers_of[method])}
            else:
                partitions = make_partitions(
                    checkpoint, method, settings.point, routers_of[method],
                    calibration=calibration if needs_calibration(method, routers_of[method]) else None,
                    seed=seed,
                    calib_tokens=calib_split.n_tokens if calib_split else 0,
                    calib_seconds=calib_split.seconds if calib_split else 0.0,
                    metanetwork=settings.metanetwork,
                    calib_source=settings.calibration,
                )
            for router, partition in partitions.items():
                report = evaluate(checkpoint, partition, heldout, model if settings.model_quality else None, reference)
                rows.append({"seed": seed, "technique": technique, **report})
                if progress:
                    progress(f"{method}/{router} ({technique}) seed {seed}: rel_error {report['rel_error']:.3f}")
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows grouped by (method, router, technique): each column's mean and population std over seeds."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["router"], row.get("technique", "none")), []).append(row)
    table = []
    for (method, router, technique), group in groups.items():
        entry = {"method": method, "router": router, "technique": technique, "seeds": len(group)}
        for column in COLUMNS:
            values = [row[column] for row in group if row.get(column) is not None]
            if values:
                entry[column] = statistics.fmean(values)
                entry[f"{column}_std"] = statistics.pstdev(values)
        table.append(entry)
    return table


def markdown_table(table: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """GitHub Markdown: mean ± std where a spread exists; a technique column when some row used a conversion technique."""
    present = [c for c in columns if any(c in row for row in table)]
    techniques = any(row.get("technique", "none") != "none" for row in table)
    keys = ["method", "router", *(["technique"] if techniques else [])]
    lines = ["| " + " | ".join(keys) + " | " + " | ".join(present) + " |", "|" + "---|" * (len(keys) + len(present))]
    for row in table:
        cells = []
        for column in present:
            if column not in row:
                cells.append("–")
            elif row.get("seeds", 1) > 1 and row[f"{column}_std"] > 0:
                cells.append(f"{row[column]:.4g} ± {row[f'{column}_std']:.2g}")
            else:
                cells.append(f"{row[column]:.4g}")
        lines.append("| " + " | ".join(str(row.get(key, "none")) for key in keys) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
