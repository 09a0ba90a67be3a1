"""Build a model zoo: many small causal LMs trained from scratch, with calibration data and teacher partitions.

    build_zoo(config, out, workers=2)   →  out/
        zoo.json, tokenizer/, data.safetensors   the shared text (training.zoo_data)
        members/{name}/                          ordinary checkpoints with their caches (training.zoo_run)
        zoo.jsonl                                the manifest: one row per finished member, plan order

Resumable and idempotent: members already in `out` are skipped (their recorded spec must match
the config's, else MetanetError), half-built ones (`members/.*.tmp`) are deleted and built again,
and the manifest is rewritten from the members' own member.json after each member and at the end,
so re-running after a kill completes the zoo. One build at a time per folder (a lock file).

`workers` processes (spawned) train runs in parallel, longest first, each with
cores // workers torch threads; with one worker everything runs in this process. Events come
back to this process, which reports progress, rewrites the manifest and logs each member to
MLflow (experiment `zoo`: its parameters, its loss curve, held-out loss and teacher rel_error).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue as queue_module
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from metanet.atomic import atomic_path
from metanet.errors import MetanetError
from training.zoo_config import RunSpec, ZooConfig, check_splits, plan_runs
from training.zoo_data import prepare_zoo_data
from training.zoo_run import MEMBER_FILE, MEMBERS_DIR, MemberDone, MemberProgress, build_run

log = logging.getLogger(__name__)

MANIFEST = "zoo.jsonl"
LOCK_FILE = ".lock"
EXPERIMENT = "zoo"


class BuildProgress:
    """What a build reports as it goes; the default ignores everything (the CLI draws rich bars)."""

    def planned(self, total: int, finished: int) -> None:
        """`total` members in the plan, `finished` of them already built."""

    def status(self, message: str) -> None:
        """A step that is not a member (preparing the shared data)."""

    def member(self, name: str, stage: str, completed: int, total: int) -> None:
        """A member under way; stage "done" (completed == total) when it is finished."""


@dataclass
class ZooSummary:
    root: Path
    rows: list[dict]  # the manifest
    built: int
    skipped: int
    seconds: float


def build_zoo(
    config: ZooConfig, out: str | Path, workers: int = 1, tracking_uri: str | None = None, progress: BuildProgress | None = None,
    splits: tuple[str, ...] | None = None,
) -> ZooSummary:
    """Build every member of `config` missing from `out` (see the module docstring); `splits`: only the members of
    those splits (e.g. ("test",) to measure on the held-out family without training data). The manifest always
    lists every finished member of the config, whatever `splits` says."""
    start = time.perf_counter()
    if workers < 1:
        raise MetanetError(f"workers must be ≥ 1, got {workers}")
    if splits is not None:
        check_splits(splits)
    root, progress = Path(out), progress or BuildProgress()
    planned = plan_runs(config)
    runs = [run for run in planned if splits is None or run.split in splits]
    with _exclusive(root):
        for partial in (root / MEMBERS_DIR).glob(".*.tmp"):
            log.info("removing the half-built member %s", partial.name)
            shutil.rmtree(partial)
        finished = _finished_members(planned, root) & {member for run in runs for member in run.members}
        total = sum(len(run.checkpoints) for run in runs)
        progress.planned(total, len(finished))
        progress.status("tokenizer and token windows")
        prepare_zoo_data(config, root)
        todo = sorted((run for run in runs if not set(run.members) <= finished), key=RunSpec.cost, reverse=True)
        totals: dict[str, int] = {}  # member → its progress units
        built: list[str] = []

        def handle(event: object) -> None:
            if isinstance(event, MemberProgress):
                totals[event.member] = event.total
                progress.member(event.member, event.stage, event.completed, event.total)
            elif isinstance(event, MemberDone):
                built.append(event.row["name"])
                _write_manifest(planned, root)
                _log_member(event, config, tracking_uri)
                progress.member(event.row["name"], "done", totals[event.row["name"]], totals[event.row["name"]])

        if workers == 1 or len(todo) <= 1:
            _build_here(todo, root, handle)
        else:
            _build_in_workers(todo, root, workers, handle)
        rows = _write_manifest(planned, root)
    return ZooSummary(root, rows, len(built), len(finished), time.perf_counter() - start)


def read_manifest(root: str | Path) -> list[dict]:
    """The rows of a zoo's zoo.jsonl."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise MetanetError(f"{root}: not a zoo (no {MANIFEST}); build one with `metanet zoo build`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_summary(rows: list[dict]) -> list[dict]:
    """Per family and over all members: count, held-out loss min / median / max, the unigram baseline."""
    groups = {family: [r for r in rows if r["family"] == family] for family in sorted({r["family"] for r in rows})}
    summary = []
    for family, group in {**groups, "all": rows}.items():
        if group:
            losses = [r["heldout_loss"] for r in group]
            summary.append({
                "family": family, "members": len(group), "heldout_min": min(losses),
                "heldout_median": statistics.median(losses), "heldout_max": max(losses), "unigram": group[0]["unigram_loss"],
            })
    return summary


# -- running ------------------------------------------------------------------------------
def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _build_here(runs: list[RunSpec], root: Path, handle: Callable[[object], None]) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(_cores())
    try:
        for run in runs:
            build_run(run, root, handle)
    finally:
        torch.set_num_threads(threads)


def _build_in_workers(runs: list[RunSpec], root: Path, workers: int, handle: Callable[[object], None]) -> None:
    """Runs in spawned processes; their events travel through a queue and are handled here, in order."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    threads = max(1, _cores() // workers)
    pool = ProcessPoolExecutor(min(workers, len(runs)), mp_context=context, initializer=_start_worker, initargs=(events, threads))
    try:
        pending = {pool.submit(_worker_build_run, run, root) for run in runs}
        while pending:
            _drain(events, handle, timeout=0.2)
            finished, pending = wait(pending, timeout=0, return_when=FIRST_COMPLETED)
            for future in finished:
                future.result()  # a failed run raises here: runs under way finish, the others are cancelled
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    _drain(events, handle, timeout=0)  # the workers have exited, so every event is in the queue


def _drain(events, handle: Callable[[object], None], timeout: float) -> None:
    with contextlib.suppress(queue_module.Empty):
        handle(events.get(timeout=timeout) if timeout else events.get_nowait())
        while True:
            handle(events.get_nowait())


_events = None  # the worker's end of the event queue


def _start_worker(events, threads: int) -> None:
    import torch

    global _events
    _events = events
    torch.set_num_threads(threads)


def _worker_build_run(run: RunSpec, root: Path) -> None:
    build_run(run, root, _events.put)


# -- files --------------------------------------------------------------------------------
@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold `root`/.lock for the build; another build on the same folder is refused."""
    import fcntl

    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / LOCK_FILE, "w")
    except OSError as exc:
        raise MetanetError(f"cannot write the zoo folder {root}: {exc.strerror or exc}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MetanetError(f"another `metanet zoo build` is writing {root}; wait for it or build into another --out") from None
        yield


def _finished_members(runs: list[RunSpec], root: Path) -> set[str]:
    """Names of the planned members already built; one built from another spec is an error."""
    finished = set()
    for run in runs:
        for steps in run.checkpoints:
            file = root / MEMBERS_DIR / run.member_name(steps) / MEMBER_FILE
            if not file.is_file():
                continue
            if json.loads(file.read_text())["spec"] != run.member_spec(steps):
                raise MetanetError(f"{file.parent} was built from another config than this one; build into another --out")
            finished.add(run.member_name(steps))
    return finished


def _write_manifest(runs: list[RunSpec], root: Path) -> list[dict]:
    """zoo.jsonl from the member.json of every finished member, in plan order, with the config's split."""
    rows = []
    for run in runs:
        for steps in run.checkpoints:
            file = root / MEMBERS_DIR / run.member_name(steps) / MEMBER_FILE
            if file.is_file():
                rows.append({**json.loads(file.read_text())["row"], "split": run.split})
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _log_member(event: MemberDone, config: ZooConfig, tracking_uri: str | None) -> None:
    """One MLflow run per member: its parameters, training-loss curve up to its step, final losses, teacher rel_error."""
    import mlflow
    from mlflow.entities import Metric

    from metanet.tracking import tracked_run

    row = event.row
    params = {key: row[key] for key in ("path", "family", "d_model", "d_ff", "n_layers", "seed", "steps", "lr", "weight_decay", "batch_size", "split")}
    params["data"] = json.dumps(config.data_settings())
    now = int(time.time() * 1000)
    with tracked_run(EXPERIMENT, row["name"], params, tracking_uri) as run:
        metrics = [Metric("loss", loss, now, step) for step, loss in event.curve]
        finals = {"train_loss": row["train_loss"], "heldout_loss": row["heldout_loss"], "unigram_loss": row["unigram_loss"], "seconds": row["seconds"]}
        finals |= {f"teacher.{name}.rel_error": value for name, value in row["teachers"].items()}
        metrics += [Metric(key, float(value), now, row["steps"]) for key, value in finals.items()]
        client = mlflow.MlflowClient()
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])

