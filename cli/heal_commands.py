"""`metanet heal`: distil an MoE checkpoint back toward its dense teacher and write the healed MoE checkpoint."""

from pathlib import Path
from typing import Optional

import typer

from cli.app import app, console, err_console
from cli.checkpoint_commands import CHECKPOINT_HELP
from cli.config import config_option
from cli.partition_commands import CORPUS_HELP, TRACKING_HELP, _summary_table
from metanet.heal.settings import HealSettings

DEFAULTS = HealSettings()


@app.command("heal")
def heal_command(
    moe_dir: Path = typer.Argument(..., help="An MoE checkpoint folder written by `metanet apply` (or an earlier heal)."),
    teacher: str = typer.Option(..., "--teacher", help=f"The dense checkpoint the MoE was converted from. {CHECKPOINT_HELP}"),
    out: Path = typer.Option(..., "--out", "-o", help="Healed MoE checkpoint folder to write; must not exist."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help=CORPUS_HELP),
    tokens: int = typer.Option(DEFAULTS.tokens, "--tokens", help="Training tokens (token budget)."),
    train: str = typer.Option(DEFAULTS.train, "--train", help="routers | routers+experts: what is trained; every other tensor stays bit-identical."),
    data: str = typer.Option(DEFAULTS.data, "--data", help="text (the corpus's calibration split) | generated (windows the dense teacher writes itself; "
                             "the corpus then serves held-out metrics only)."),
    pool_tokens: int = typer.Option(DEFAULTS.pool_tokens, "--pool-tokens", help="--data generated: tokens the teacher writes once at the start "
                                    "(fewer when --tokens is smaller), cycled in shuffled epochs; kept for --resume."),
    lr: float = typer.Option(DEFAULTS.lr, "--lr", help="AdamW learning rate (linear warmup, then constant)."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", help="Token windows per optimizer step."),
    seq_len: int = typer.Option(DEFAULTS.seq_len, "--seq-len", help="Tokens per window."),
    output_weight: float = typer.Option(DEFAULTS.output_weight, "--output-weight", help="Weight of the next-token KL (causal LMs) or embedding loss (encoders)."),
    ffn_weight: float = typer.Option(DEFAULTS.ffn_weight, "--ffn-weight", help="Weight of the per-layer FFN output matching."),
    balance_weight: float = typer.Option(DEFAULTS.balance_weight, "--balance-weight", help="Weight of the switch-style load-balancing term."),
    warmup_steps: int = typer.Option(DEFAULTS.warmup_steps, "--warmup-steps", help="Optimizer steps of linear learning-rate warmup."),
    eval_tokens: int = typer.Option(DEFAULTS.eval_tokens, "--eval-tokens", help="Held-out tokens ppl_ratio and rel_error are measured on."),
    eval_every: int = typer.Option(DEFAULTS.eval_every, "--eval-every", help="Training tokens between held-out measurements."),
    checkpoint_every: int = typer.Option(DEFAULTS.checkpoint_every, "--checkpoint-every", help="Optimizer steps between resume points."),
    precision: str = typer.Option(DEFAULTS.precision, "--precision", help="32-true | bf16-mixed (GPUs)."),
    seed: int = typer.Option(DEFAULTS.seed, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run for this --out."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    config: Optional[Path] = config_option(),
) -> None:
    """Distil the MoE model toward the dense one (KL + per-layer FFN matching + load balance); write the healed MoE checkpoint."""
    import logging

    import lightning.pytorch  # noqa: F401  (it sets its own log level on import; ours comes after)

    from metanet.heal import heal

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # device banners and tips; our own log says what matters
    settings = HealSettings(
        tokens=tokens, train=train, data=data, pool_tokens=pool_tokens, lr=lr, batch_size=batch_size, seq_len=seq_len, output_weight=output_weight,
        ffn_weight=ffn_weight, balance_weight=balance_weight, warmup_steps=warmup_steps, eval_tokens=eval_tokens,
        eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed, precision=precision,
    )
    result = heal(moe_dir, teacher, out, settings, corpus=corpus, resume=resume, tracking_uri=tracking_uri, progress=err_console.is_terminal)
    before, after = result["before"], result["after"]
    quality = next(key for key in before if key not in ("tokens", "rel_error"))
    console.print(_summary_table(f"healed {moe_dir}", {
        "trained": train, "data": data, "tokens": result["tokens"], "steps": result["steps"],
        **({"resumed from tokens": result["resumed_from"]} if result["resumed_from"] else {}),
        f"{quality} before → after": f"{before[quality]:.4f} → {after[quality]:.4f}",
        "rel_error before → after": f"{before['rel_error']:.4f} → {after['rel_error']:.4f}",
        "seconds": result["seconds"], "written": result["out"],
    }))
