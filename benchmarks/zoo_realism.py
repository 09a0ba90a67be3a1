"""How much the zoo's members look like real LLMs (issue "The metanetwork earns its place", item 2): statistics of
their FFNs next to SmolLM2-135M-Instruct's and all-MiniLM-L6-v2's.

Per FFN layer, on the FFN inputs x [T, d] of 4096 held-out Shakespeare tokens, with hidden activations a = act(w_in·x)(⊙ w_gate·x)
and each neuron's output mass m_tj = |a_tj|·‖w_out[:, j]‖ (what neuron j writes for token t):

    top10_mass     mean over tokens of the share of Σ_j m_tj held by the token's top 10% neurons
    top25_mass     the same for the top 25% (what a perfect 25%-active router could keep)
    participation  (Σ_j m_tj)² / Σ_j m_tj² / f, mean over tokens: the fraction of neurons a token effectively uses
    outlier_ratio  the largest input coordinate's RMS over the median coordinate's RMS (massive activations)
    outlier_offset |mean| / RMS of that largest coordinate over the tokens: 1 for a constant offset, 0 for a
                   zero-mean spike

then the mean over layers (outlier_ratio and outlier_offset: those of the layer with the largest outlier_ratio).
Beside them, from metanet-ablation.json (the shipped metanetwork, data-free, its own router, E = 16, k = 4: 25%
active): oracle_rel_error and the whole-model figure (ppl_ratio on held-out Shakespeare; embedding cosine for MiniLM). Zoo members: those in the --zoo folder (the test
split's seed-0 members when built with `metanet zoo build --config configs/zoo.yaml --seeds 0 --splits test`).

--recipes FOLDER... measures, beside them, every member of other zoo folders at every checkpoint, with its learning
rate and held-out loss: training recipes tried for making members that look more like real LLMs (the table says
which). Each option re-measures only its own rows and keeps the other's.
Writes benchmarks/results/zoo-realism.md and .json.

Run: .venv/bin/python -m benchmarks.zoo_realism --zoo benchmarks/.work/zoo
     .venv/bin/python -m benchmarks.zoo_realism --recipes benchmarks/.work/zoo-long-0.003 benchmarks/.work/zoo-long-0.01-wd0 ...

A recipe folder is one member built with the recipe's options, e.g. (zoo-realism.md's lr 0.01 rows):

    metanet zoo build --out benchmarks/.work/zoo-long-0.01-wd0 --families llama --d-models 192 --ffn-ratios 3 \
        --depths 4 --architectures 1 --seeds 0 --checkpoints 400,1500 --lrs 0.01 --weight-decays 0 --batch-size 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall on shared cores

import torch  # noqa: E402

from metanet.calib import load_corpus, load_model_and_tokenizer, text_split  # noqa: E402
from metanet.checkpoints import open_checkpoint  # noqa: E402

TOKENS = 4096
REAL = ("SmolLM2-135M-Instruct", "all-MiniLM-L6-v2")
STATISTICS = ("top10_mass", "top25_mass", "participation", "outlier_ratio", "outlier_offset")
RESULTS = Path(__file__).parent / "results"

log = logging.getLogger("zoo_realism")


def top_share(mass: torch.Tensor, fraction: float) -> float:
    """Mean over tokens of the share of a token's total mass held by its top `fraction` of neurons.   mass: [T, f]"""
    top = mass.topk(max(1, round(fraction * mass.shape[1])), dim=1).values.sum(1)
    return (top / mass.sum(1).clamp(min=1e-30)).mean().item()


def layer_statistics(layer, x: torch.Tensor) -> dict[str, float]:
    """The module docstring's statistics of one FFN layer on its inputs x [T, d]."""
    with torch.no_grad():
        mass = layer.hidden(x).abs() * layer.w_out.norm(dim=0)  # [T, f]
        participation = (mass.sum(1).pow(2) / mass.pow(2).sum(1).clamp(min=1e-30)).mean().item() / mass.shape[1]
        rms = x.pow(2).mean(0).sqrt()  # [d]
        largest = rms.argmax()
    return {"top10_mass": top_share(mass, 0.10), "top25_mass": top_share(mass, 0.25), "participation": participation,
            "outlier_ratio": (rms[largest] / rms.median().clamp(min=1e-30)).item(),
            "outlier_offset": (x[:, largest].mean().abs() / rms[largest].clamp(min=1e-30)).item()}


def checkpoint_statistics(name: str) -> dict:
    """Statistics of every FFN layer of checkpoint `name`, summarised over layers, with the checkpoint's shape."""
    checkpoint = open_checkpoint(name)
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    inputs = text_split(model, tokenizer, checkpoint.family.name, "heldout", TOKENS, load_corpus(None)).ffn_inputs.layers
    per_layer = [layer_statistics(layer, inputs[layer.index]) for layer in checkpoint.layers()]  # layers in float32
    outlier_layer = max(per_layer, key=lambda s: s["outlier_ratio"])
    summary = {key: outlier_layer[key] if key.startswith("outlier") else statistics.fmean(s[key] for s in per_layer) for key in STATISTICS}
    first = checkpoint.layer(0)
    log.info("%s: %s", name, {k: round(v, 4) for k, v in summary.items()})
    return {"checkpoint": str(name), "family": checkpoint.family.name, "d_model": first.d_model, "d_ff": first.d_ff,
            "n_layers": checkpoint.n_layers, "gated": first.w_gate is not None, **summary, "per_layer": per_layer}


def at_25_percent(name: str, ablation: dict) -> dict:
    """oracle_rel_error and whole-model quality of the shipped metanetwork at k = 4 (metanet-ablation.json), where measured."""
    rows = [r for target in ablation["targets"].values() for r in target] + ablation.get("zoo_members", [])
    row = next((r for r in rows if r.get("checkpoint") == str(name) and r["variant"] == "shipped" and r["active"] == 4), None)
    if row is None:
        return {}
    quality = row.get("ppl_ratio.shakespeare", row.get("embedding_cosine.shakespeare"))
    return {"oracle_rel_error": row["oracle_rel_error"], "quality_25": quality,
            "quality_metric": "ppl_ratio" if "ppl_ratio.shakespeare" in row else "embedding_cosine"}


def report(results: dict) -> str:
    lines = [
        "# How much the zoo looks like real LLMs",
        "",
        f"Measured {results['date']} on {results['machine']} by `benchmarks/zoo_realism.py` (per-layer figures: zoo-realism.json). "
        f"FFN statistics on {TOKENS} held-out Shakespeare tokens, per layer, then the mean over layers: *top 10% / top 25% mass*, "
        "the share of what a token's FFN writes (Σ_j |a_j|·‖w_out[:, j]‖) held by its 10% / 25% most active neurons (a perfect "
        "25%-active router keeps the latter); *participation*, (Σ m)² / Σ m² / f, the fraction of neurons a token effectively uses; "
        "*outlier ratio*, the largest FFN input coordinate's RMS over the median coordinate's (the largest over layers: massive "
        "activations); *outlier offset*, that coordinate's |mean| / RMS over the tokens (1: a constant offset, 0: a zero-mean spike). *oracle rel_error* and *quality at 25%*: the shipped metanetwork, data-free, its own router, E = 16, k = 4, "
        "from metanet-ablation.json (ppl_ratio on held-out Shakespeare; embedding cosine for MiniLM). Zoo rows: the members in "
        f"{results['zoo'] or '(no zoo given)'}.",
        "",
        "| checkpoint | family | d / f / layers | gated | top 10% mass | top 25% mass | participation | outlier ratio | outlier offset | oracle rel_error (k=4) | quality at 25% |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        quality = f"{r['quality_metric']} {r['quality_25']:,.4g}" if "quality_25" in r else "—"
        oracle = f"{r['oracle_rel_error']:.3f}" if "oracle_rel_error" in r else "—"
        name = Path(r["checkpoint"]).name
        lines.append(f"| {name} | {r['family']} | {r['d_model']} / {r['d_ff']} / {r['n_layers']} | {'yes' if r['gated'] else 'no'} | "
                     f"{r['top10_mass']:.3f} | {r['top25_mass']:.3f} | {r['participation']:.3f} | {r['outlier_ratio']:.1f} | {r['outlier_offset']:.2f} | {oracle} | {quality} |")
    zoo = [r for r in results["rows"] if r["checkpoint"] not in REAL]
    if zoo:
        lines += ["", "Zoo range against the real models (min – max over the zoo rows):", ""]
        for key in STATISTICS:
            low, high = min(r[key] for r in zoo), max(r[key] for r in zoo)
            real = ", ".join(f"{Path(r['checkpoint']).name} {r[key]:.3g}" for r in results["rows"] if r["checkpoint"] in REAL)
            inside = [Path(r["checkpoint"]).name for r in results["rows"] if r["checkpoint"] in REAL and low <= r[key] <= high]
            lines.append(f"- {key}: zoo {low:.3g} – {high:.3g}; {real}; bracketed: {', '.join(inside) or 'neither'}")
    if results.get("recipes"):
        lines += ["", "## Training recipes: what makes a member's FFN inputs carry massive coordinates", "",
                  f"Members of {', '.join(results['recipe_folders'])} at every checkpoint (batches of 8 × 128 tokens of the "
                  "Shakespeare plays, the zoo's AdamW with warmup and cosine decay to the last checkpoint). held-out − unigram: the "
                  "member's held-out loss minus the unigram baseline's, in nats (how far training went).", "",
                  "| member | lr | weight decay | steps | held-out − unigram | top 10% mass | top 25% mass | participation | outlier ratio | outlier offset |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["recipes"]:
            lines.append(f"| {r['run']} | {r['lr']:g} | {r['weight_decay']:g} | {r['steps']:,} | {r['heldout_loss'] - r['unigram_loss']:+.2f} | "
                         f"{r['top10_mass']:.3f} | {r['top25_mass']:.3f} | {r['participation']:.3f} | {r['outlier_ratio']:.1f} | {r['outlier_offset']:.2f} |")
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="A zoo folder: every member in its manifest at its last checkpoint is measured.")
    parser.add_argument("--recipes", type=Path, nargs="+", help="Zoo folders whose members are measured at every checkpoint.")
    parser.add_argument("--report", action="store_true", help="Rebuild zoo-realism.md from the JSON; measure nothing.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    store = RESULTS / "zoo-realism.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    if not args.report:
        from training.zoo import read_manifest

        if args.recipes:
            recipe_fields = ("run", "lr", "weight_decay", "steps", "heldout_loss", "unigram_loss")
            results["recipes"] = [checkpoint_statistics(str(folder / row["path"])) | {key: row[key] for key in recipe_fields}
                                  for folder in args.recipes for row in read_manifest(folder)]
            results["recipe_folders"] = [str(folder) for folder in args.recipes]
        else:
            names = list(REAL)
            if args.zoo:
                manifest = read_manifest(args.zoo)
                last = max(row["steps"] for row in manifest)
                names += [str(args.zoo / row["path"]) for row in manifest if row["steps"] == last]
            ablation_file = RESULTS / "metanet-ablation.json"
            ablation = json.loads(ablation_file.read_text()) if ablation_file.is_file() else {"targets": {}}
            results["rows"] = [checkpoint_statistics(name) | at_25_percent(name, ablation) for name in names]
            results["zoo"] = str(args.zoo) if args.zoo else None
        results |= {"date": str(datetime.date.today()),
                    "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU, torch {torch.__version__}"}
        store.write_text(json.dumps(results, indent=1))
    (RESULTS / "zoo-realism.md").write_text(report(results))
    log.info("wrote %s", RESULTS / "zoo-realism.md")


if __name__ == "__main__":
    main()
