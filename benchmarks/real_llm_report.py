"""benchmarks/results/real-llm.md from real-llm.json (`python -m benchmarks.real_llm --report`).

The measured tables are generated; the prose around them lives in real-llm-notes.md (written by hand from
the figures) and is appended as it is.
"""

from __future__ import annotations

from pathlib import Path

#: The issue's bars on SmolLM2 (training-free, ≤ 16k calibration tokens): active fraction → held-out ppl_ratio.
BARS = {0.25: 5.0, 0.5: 1.5, 0.75: 1.15}
NO_TEXT_BARS = {0.5: 2.0}  # calibration the model writes itself, no text at all (no other-domain bar)
TECHNIQUE_ORDER = ("none", "sequential", "compensation", "both", "full", "plan")  # the ablation's rows, in the order they add up
OTHER_DOMAIN_SLACK = 1.25  # the other domain may be 25% worse
DEFAULT_EXPERTS = 16  # every table but the granularity one holds E=16 rows only
NOTES = Path(__file__).parent / "results" / "real-llm-notes.md"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if value < 100 else f"{value:,.0f}"


def _quality(row: dict, domain: str) -> float | None:
    return row.get(f"ppl_ratio.{domain}", row.get(f"embedding_cosine.{domain}"))


def _label(row: dict) -> str:
    shared = f", {row['shared']} shared" if row["shared"] else ""
    bias = ", no output bias" if row.get("output_bias", True) is False else ""
    experts = f", E={row['experts']}" if row["experts"] != DEFAULT_EXPERTS else ""
    return f"{row['method']}/{row['router']}, {row['technique']}, {row['calibration']}{experts}{shared}{bias}"


def _export_table(rows: list[dict]) -> list[str]:
    """metanet's runtime against the GLM-4-MoE export of the same conversion, per domain."""
    lines = ["| pipeline | active | Shakespeare: metanet → export | mlflow-docs: metanet → export | chosen of routed experts | export MB |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{_fmt(row[f'ppl_ratio.{d}'])} → {_fmt(row[f'export.ppl_ratio.{d}'])} ({100 * (row[f'export.ppl_ratio.{d}'] / row[f'ppl_ratio.{d}'] - 1):+.2f}%)"
                 for d in ("shakespeare", "mlflow-docs")]
        lines.append(f"| {_label(row)} | {row['active_fraction']:.2f} (k={row['active']}) | {cells[0]} | {cells[1]} | "
                     f"{row['export.experts_per_token']} of {row['export.routed_experts']} | {row['export.size_mb']:.0f} |")
    return lines


def _table(rows: list[dict], first: str) -> list[str]:
    lines = [f"| {first} | active | Shakespeare | mlflow-docs | rel_error | oracle rel_error | convert s |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {_label(row)} | {row['active_fraction']:.2f} (k={row['active']}) | {_fmt(_quality(row, 'shakespeare'))} | "
                     f"{_fmt(_quality(row, 'mlflow-docs'))} | {row['rel_error']:.3f} | {row['oracle_rel_error']:.3f} | {row['convert_s']:.0f} |")
    return lines


def _verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else f"missed by ×{value / limit:.2f}"


def _bar_cell(row: dict) -> str:
    fraction = round(row["active_fraction"], 2)
    own, other = _quality(row, "shakespeare"), _quality(row, "mlflow-docs")
    if row["calibration"] == "generated":
        bar = NO_TEXT_BARS.get(fraction)
        return "–" if bar is None else f"no text: ≤ {bar}: {_verdict(own, bar)}"
    bar = BARS.get(fraction)
    if bar is None:
        return "–"
    return f"≤ {bar} / ≤ {bar * OTHER_DOMAIN_SLACK:.3g}: {_verdict(own, bar)} / {_verdict(other, bar * OTHER_DOMAIN_SLACK)}"


def _ablation_order(row: dict) -> tuple:
    return TECHNIQUE_ORDER.index(row["technique"]), row["experts"], row["active"], row["shared"], _label(row)


def write_report(results: dict, path: Path) -> Path:
    rows = list(results["rows"].values())
    smol_all = [r for r in rows if r["checkpoint"].startswith("SmolLM2")]
    smol = [r for r in smol_all if r["experts"] == DEFAULT_EXPERTS]
    mini = [r for r in rows if not r["checkpoint"].startswith("SmolLM2")]
    lines = [
        "# Real LLMs: training-free conversion of SmolLM2-135M-Instruct",
        "",
        f"Measured {results.get('date')} on {results.get('machine')} by `benchmarks/real_llm.py` (raw figures: real-llm.json). "
        "SmolLM2-135M-Instruct is the bundled Q4_1 GGUF, dequantised to float32 (llama family, SwiGLU, 30 blocks, d=576, f=1536); "
        "E=16 experts of 96 neurons unless a row says otherwise (E=32 and E=64: 48 and 24 neurons). Quality is whole-model ppl_ratio (MoE perplexity / dense perplexity; lower is better) on 4096 "
        "held-out tokens of each domain: *Shakespeare* (held-out plays of the default corpus) and *mlflow-docs* (Markdown guides "
        "inside the installed mlflow package: technical English with code, which no calibration ever sees). rel_error is the mean "
        "per-block FFN output error on held-out Shakespeare (a diagnostic), measured on the dense model's FFN inputs. "
        "Calibration: ≤ 16,384 tokens; *mix* is half Shakespeare calibration text, half windows the model writes itself; "
        "*generated* is windows the model writes only (no text). convert s: the whole conversion, calibration included, on this machine "
        "(its 2 cores were shared with other jobs, so times vary by up to ×2 between rows); plan rows add the sensitivity "
        "measurement (sensitivity_s in the JSON), shared by every plan row.",
        "",
        "## Headline: the default pipeline at 25 / 50 / 75% active FFN",
        "",
        "| pipeline | active | Shakespeare | mlflow-docs | bars (Shakespeare / other domain) |",
        "|---|---|---|---|---|",
    ]
    headline = [r for r in smol if r["technique"] in ("full", "plan") and r["method"] == "cmoe" and r["router"] == "lsq" and not r["shared"]]
    for row in sorted(headline, key=lambda r: (r["active_fraction"], r["technique"], r["calibration"])):
        lines.append(f"| {_label(row)} | {row['active_fraction']:.2f} | {_fmt(_quality(row, 'shakespeare'))} | "
                     f"{_fmt(_quality(row, 'mlflow-docs'))} | {_bar_cell(row)} |")
    sections = [
        ("Ablation: each technique at 50% active (cmoe/lsq, mix calibration)", "technique",
         [r for r in smol if r["method"] == "cmoe" and r["router"] == "lsq" and r["active"] == 8 and r["calibration"] == "mix"]),
        ("Methods at 50% active: as `metanet partition` made them (none) and through the full pipeline, with mix calibration and with "
         "no text (generated)", "method",
         [r for r in smol if r["router"] == "lsq" and r["active"] == 8 and r["technique"] in ("none", "full") and not r["shared"]
          and (r["calibration"] == "mix" or (r["calibration"] == "generated" and r["technique"] == "full"))]),
        ("Routers at 50% active (cmoe partition, full pipeline)", "router",
         [r for r in smol if r["method"] == "cmoe" and r["technique"] == "full" and r["active"] == 8 and r["calibration"] == "mix" and not r["shared"]]),
        ("Data-aware methods at 25 / 50 / 75% active (full pipeline, lsq, mix calibration)", "method",
         [r for r in smol if r["router"] == "lsq" and r["technique"] == "full" and r["calibration"] == "mix" and not r["shared"]
          and r.get("output_bias", True) and r["method"] in ("cmoe", "kmeans", "metanet-data")]),
        ("Expert granularity at 50% active: more, smaller experts (cmoe/lsq, full, mix, no output bias)", "experts",
         [r for r in smol_all if r["method"] == "cmoe" and r["router"] == "lsq" and r["technique"] == "full" and r["calibration"] == "mix"
          and not r["shared"] and r.get("output_bias", True) is False and r["active"] * 2 == r["experts"]]),
    ]
    for title, first, chosen in sections:
        if chosen:
            lines += ["", f"## {title}", "", *_table(sorted(chosen, key=_ablation_order), first)]
    plans = [r for r in smol if r.get("plan")]
    if plans:
        lines += ["", "## Per-block plans", "", "Active experts per block (block 0 first), chosen from each block's measured sensitivity "
                  "(its ppl_ratio alone at k = 2, 4, 8, 12, on 4096 calibration tokens not used for fitting), and the ppl_ratio the "
                  "additive model predicted for the plan:", ""]
        for row in plans:
            lines.append(f"- {_label(row)}, {row['active_fraction']:.2f} active: k = {' '.join(map(str, row['plan']))}; predicted "
                         f"{row['predicted_ppl_ratio']:.3f}, measured {_fmt(_quality(row, 'shakespeare'))} (Shakespeare)")
    exported = [r for r in smol_all if "export.ppl_ratio.shakespeare" in r]
    if exported:
        lines += ["", "## Exported to transformers (GLM-4-MoE, `--format transformers`)", "",
                  "The same conversion compensated without an output bias (GLM-4-MoE's MLPs have none), run by metanet's runtime and "
                  "written as a Glm4MoeForCausalLM folder that plain transformers loads (routing approximated by a scaled sigmoid "
                  "router: README \"`--format transformers`\"). A plan's blocks are padded with zero experts to one size: every "
                  "block then chooses K of R routed experts, the largest k of the plan.", "",
                  *_export_table(sorted(exported, key=lambda r: (r["experts"], r["active_fraction"], r["technique"])))]
    if mini:
        lines += ["", "## all-MiniLM-L6-v2 beside it (an encoder: embedding cosine with the dense model, higher is better)", "",
                  *_table(sorted(mini, key=lambda r: (_label(r), r["active"])), "pipeline")]
    if NOTES.exists():
        lines += ["", NOTES.read_text().rstrip()]
    path.write_text("\n".join(lines) + "\n")
    return path
