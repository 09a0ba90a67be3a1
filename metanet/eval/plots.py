"""Plots a person would rather look at than read (matplotlib, PNG, headless)."""

from __future__ import annotations

import itertools
from pathlib import Path


def _pyplot():
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def plot_rel_error_by_layer(rel_errors: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """One line per method: rel_error of each layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in rel_errors.items():
        ax.plot(range(len(values)), values, marker="o", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("rel_error  ‖Y − Y_moe‖ / ‖Y‖")
    ax.set_title(title or "held-out FFN output error per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def sorted_load_profile(layers: list[dict]) -> list[float]:
    """Tokens per expert, busiest first, averaged over layers (expert ids mean nothing across layers)."""
    profiles = [sorted(layer["expert_load"], reverse=True) for layer in layers]
    return [sum(column) / len(profiles) for column in zip(*profiles)]


def plot_expert_load(loads: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """Bars of held-out tokens per expert rank (see sorted_load_profile), one panel per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(loads), 1, figsize=(7, 1.6 * len(loads) + 0.8), squeeze=False, sharex=True)
    for ax, (label, load) in zip(axes[:, 0], loads.items()):
        ax.bar(range(len(load)), load, color="tab:blue")
        ax.axhline(sum(load) / len(load), color="tab:red", lw=1, ls="--")
        ax.set_ylabel(label, rotation=0, ha="right", fontsize=8)
    axes[-1, 0].set_xlabel("expert rank (busiest first; shared experts receive every token)")
    fig.suptitle(title or "held-out tokens per expert, mean over layers (dashed: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_expert_load_by_layer(layers: list[dict], path: str | Path, shared: int = 0, title: str = "") -> Path:
    """A grid of bar charts, one per layer: held-out tokens each expert received, by expert id.

    `layers` is `evaluate`'s report["layers"] (each with "index", "expert_load" and
    "load_cv"). The first `shared` experts (grey) receive every token; the dashed line is
    the perfectly balanced load of the routed ones.
    """
    plt = _pyplot()
    cols = min(3, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows + 0.7), squeeze=False, sharey=True)
    for ax, layer in zip(axes.flat, layers):
        load = layer["expert_load"]
        routed = load[shared:]
        ax.bar(range(len(load)), load, color=["tab:gray"] * shared + ["tab:blue"] * len(routed))
        if routed:
            ax.axhline(sum(routed) / len(routed), color="tab:red", lw=1, ls="--")
        ax.set_title(f"layer {layer['index']}  (load_cv {layer['load_cv']:.2f})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("expert id", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("tokens", fontsize=8)
    fig.suptitle(title or "held-out tokens per expert (grey: shared; dashed: balanced load)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_layer_partition(assign, activation_rate, path: str | Path, shared: int = 0, title: str = "") -> Path:
    """One layer's partition as a picture: every hidden neuron a bar, grouped by expert.

    assign: int [f] expert id per neuron; activation_rate: float [f] in [0, 1] (tensors or
    arrays, e.g. NeuronStats.activation_rate). Neurons are ordered by expert id, then by
    activation rate (highest first); bar height and colour are the activation rate,
    vertical lines mark expert boundaries, a black tick each expert's mean rate, and the
    first `shared` experts are shaded.
    """
    import numpy as np

    plt = _pyplot()
    assign, rate = np.asarray(assign).astype(int), np.asarray(activation_rate, dtype=float)
    order = np.lexsort((-rate, assign))  # by expert, then busiest first
    sizes = np.bincount(assign)
    edges = np.concatenate([[0], np.cumsum(sizes)])
    colour, norm = plt.get_cmap("viridis"), plt.Normalize(0, max(rate.max(), 1e-12))
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.bar(np.arange(len(rate)), rate[order], width=1.0, color=colour(norm(rate[order])), linewidth=0)
    for expert, (start, stop) in enumerate(itertools.pairwise(edges)):
        if expert < shared:
            ax.axvspan(start - 0.5, stop - 0.5, color="0.85", zorder=0)
        if stop > start:
            ax.hlines(rate[order][start:stop].mean(), start - 0.5, stop - 0.5, color="black", lw=1.5)
    ax.vlines(edges[1:-1] - 0.5, 0, 1, transform=ax.get_xaxis_transform(), color="tab:red", lw=0.6)
    if len(sizes) <= 32:
        ax.set_xticks((edges[:-1] + edges[1:]) / 2 - 0.5, [str(e) for e in range(len(sizes))], fontsize=7)
    ax.set_xlim(-0.5, len(rate) - 0.5)
    ax.set_xlabel("expert (neurons sorted by activation rate inside each" + ("; shaded: shared)" if shared else ")"))
    ax.set_ylabel("activation rate")
    ax.set_title(title or "neurons grouped by expert, coloured by activation rate (black: expert mean)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=colour), ax=ax, pad=0.01, label="activation rate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_speedup(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """FFN speed-up of the MoE over the dense model (dense ms / MoE ms) against tokens per call.

    `rows` is `metanet.eval.speed.ffn_speed`'s output; each point is labelled with the path the
    kernels took; the dashed line at 1 is parity (above: the MoE is faster). Rows timed as CUDA-graph
    replays too (`graph_speedup`) add a second line: GPU time alone, without host launch costs.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    tokens = [row["tokens"] for row in rows]
    speedups = [row["speedup"] for row in rows]
    ax.plot(tokens, speedups, marker="o", color="tab:blue", label="eager calls")
    graphed = [row for row in rows if "graph_speedup" in row]
    if graphed:
        ax.plot([row["tokens"] for row in graphed], [row["graph_speedup"] for row in graphed], marker="s", color="tab:orange",
                label="CUDA-graph replays")
        ax.legend(fontsize=8)
    for row in rows:
        ax.annotate("/".join(row["paths"]), (row["tokens"], row["speedup"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.axhline(1.0, color="tab:gray", lw=1, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per call T")
    ax.set_ylabel("speed-up  (dense ms / MoE ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "MoE FFN speed-up over the dense FFN")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_pareto(curves: dict[str, list[tuple[float, float]]], uniform: dict[str, list[tuple[float, float]]], path: str | Path,
                chosen: tuple[float, float] | None = None, title: str = "") -> Path:
    """Modelled ppl_ratio against the active FFN fraction: one line per method (its best per-block plans,
    `metanet.conversion.plan.pareto_curve`), its uniform-k points marked (every block at the same measured k),
    and the chosen plan as a star. Log scale on the ratio (1 is the dense model)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    colours = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for label, colour in zip(curves, colours):
        fractions, ratios = zip(*curves[label]) if curves[label] else ((), ())
        ax.step(fractions, ratios, where="post", color=colour, label=f"{label}: per-block plans")
        if uniform.get(label):
            ax.scatter(*zip(*uniform[label]), color=colour, marker="o", edgecolor="black", zorder=3, label=f"{label}: uniform k")
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], marker="*", s=180, color="gold", edgecolor="black", zorder=4, label="chosen plan")
    ax.axhline(1.0, color="tab:gray", lw=1, ls="--")
    ax.set_yscale("log")
    plain = matplotlib_ticker().FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("active FFN fraction (mean over blocks of k/E)")
    ax.set_ylabel("modelled ppl_ratio (MoE / dense)")
    ax.set_title(title or "modelled perplexity cost of per-block plans")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_per_block(values: list[float], path: str | Path, metric: str = "ppl_ratio", title: str = "") -> Path:
    """Bars of a whole-model metric with only block ℓ converted, one bar per block (`per_block_quality`);
    the dashed line is the dense model (1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(values) + 2), 3.4))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.axhline(1.0, color="tab:gray", lw=1, ls="--")
    ax.set_xlabel("block converted alone")
    ax.set_ylabel(metric)
    if metric == "ppl_ratio":
        ax.set_ylim(bottom=min(1.0, min(values, default=1.0)) * 0.98)
    ax.set_title(title or f"{metric} with only one block converted")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
