"""Train one run of a zoo and write its members, only ever as complete folders.

Member `name` is built in `members/.{name}.tmp`, created when training towards its step count
starts; at that step the folder receives the checkpoint (model and tokenizer, save_pretrained),
its caches (training.member_cache) and member.json (its manifest row and the spec its weights
came from), and is then renamed to `members/{name}`. A crash at any point leaves at most a
`.tmp` folder, which the next build deletes. Members that already exist are not rewritten:
their steps are trained again on the way to the missing ones (the same seed gives the same
batches; on CPU the same weights up to floating-point summation order).

Events go to `emit`: MemberProgress while a member is under way, MemberDone when it is finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from training.lm import LMTrainer, build_lm, random_windows, token_loss
from training.member_cache import CACHE_STAGES, write_member_cache
from training.zoo_config import RunSpec
from training.zoo_data import ZooData, load_zoo_data

log = logging.getLogger(__name__)

MEMBERS_DIR = "members"
MEMBER_FILE = "member.json"
CURVE_POINTS = 100  # points of a run's logged loss curve
PROGRESS_UPDATES = 50  # MemberProgress events per member's training, at most


@dataclass
class MemberProgress:
    member: str
    stage: str  # "train", then "save" and the cache stages
    completed: int  # progress units: training steps since the previous member written, then one per stage
    total: int


@dataclass
class MemberDone:
    row: dict  # the member's manifest row
    curve: list[tuple[int, float]]  # (step, mean training loss over the steps since the previous point)


def build_run(run: RunSpec, root: Path, emit: Callable[[object], None]) -> None:
    """Train `run` from its seed and write every member of it missing from `root`/members."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # save_pretrained's bars; the build reports its own progress
    data = load_zoo_data(root)
    members = root / MEMBERS_DIR
    torch.manual_seed(run.seed)
    model = build_lm(run.shape, len(data.tokenizer), data.tokenizer.eos_token_id)
    trainer = LMTrainer(model, run.settings, run.checkpoints[-1])
    generator = torch.Generator().manual_seed(run.seed)
    losses: list[float] = []
    for steps in run.checkpoints:
        name = run.member_name(steps)
        if (members / name).exists():
            continue  # its training steps are run on the way to the next missing member
        start, first = time.perf_counter(), len(losses)
        tmp = members / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        report = _Reporter(emit, name, total=steps - first + 1 + CACHE_STAGES, report_every=max(1, (steps - first) // PROGRESS_UPDATES))
        while len(losses) < steps:
            losses.append(trainer.step(random_windows(data.train, run.batch_size, run.shape.max_positions, generator)))
            report.step(len(losses) - first, last=len(losses) == steps)
        row = _write_member(tmp, run, steps, model, data, report)
        row["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / MEMBER_FILE).write_text(json.dumps({"row": row, "spec": run.member_spec(steps)}, indent=2))
        os.rename(tmp, members / name)
        log.info("zoo member %s: held-out loss %.3f (unigram %.3f)", name, row["heldout_loss"], data.unigram_loss)
        emit(MemberDone(row, loss_curve(losses, max(1, run.checkpoints[-1] // CURVE_POINTS))))


class _Reporter:
    """MemberProgress events of one member: training steps (every `report_every` and the last), then one unit per stage."""

    def __init__(self, emit: Callable[[object], None], name: str, total: int, report_every: int):
        self.emit, self.name, self.total, self.report_every = emit, name, total, report_every
        self.completed = 0

    def step(self, done: int, last: bool) -> None:
        if last or done % self.report_every == 0:
            self.completed = done
            self.emit(MemberProgress(self.name, "train", done, self.total))

    def __call__(self, stage: str) -> None:
        self.completed += 1
        self.emit(MemberProgress(self.name, stage, self.completed, self.total))


def _write_member(folder: Path, run: RunSpec, steps: int, model: torch.nn.Module, data: ZooData, report: _Reporter) -> dict:
    """Checkpoint and caches into `folder`; returns the member's manifest row (without `seconds`)."""
    model.eval()
    model.save_pretrained(folder)
    data.tokenizer.save_pretrained(folder)
    report("save")
    name = run.member_name(steps)
    teachers = write_member_cache(folder, model, data.calibration, data.heldout, str(folder.parent / name), report)
    s = run.shape
    return {
        "path": f"{MEMBERS_DIR}/{name}", "name": name, "run": run.name, "architecture": run.architecture,
        "family": s.family, "model_type": model.config.model_type, "d_model": s.d_model, "d_ff": s.d_ff,
        "ffn_ratio": round(s.d_ff / s.d_model, 3), "n_layers": s.n_layers, "n_heads": s.n_heads, "seed": run.seed,
        "steps": steps, "lr": run.settings.lr, "weight_decay": run.settings.weight_decay, "batch_size": run.batch_size,
        "seq_len": s.max_positions, "train_loss": token_loss(model, data.train_sample), "heldout_loss": token_loss(model, data.heldout),
        "unigram_loss": data.unigram_loss, "split": run.split,
        "teachers": {teacher: facts["rel_error"] for teacher, facts in teachers.items()},
    }


def loss_curve(losses: list[float], every: int) -> list[tuple[int, float]]:
    """Mean loss of each `every` consecutive steps (the last group may be shorter), at its last step (1-based)."""
    curve = []
    for start in range(0, len(losses), every):
        chunk = losses[start : start + every]
        curve.append((start + len(chunk), sum(chunk) / len(chunk)))
    return curve
