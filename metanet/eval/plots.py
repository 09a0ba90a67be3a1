"""Plots a person would rather look at than read (matplotlib, PNG, headless)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
