"""MLflow runs: every command that computes logs one run.

Tracking URI, in order: the command's `--tracking-uri`, the MLFLOW_TRACKING_URI
environment variable, else `sqlite:///mlflow.db` in the working folder (open it with
`mlflow ui --backend-store-uri sqlite:///mlflow.db`). Experiments created in a sqlite store keep
their artifacts in `mlruns/` beside the database file, not in whatever folder a command ran from.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: When set (by `metanet run`), every run is a child of this run, in its experiment, tagged with its command.
PARENT_RUN_ENV = "METANET_PARENT_RUN_ID"


def resolve_tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@contextlib.contextmanager
def tracked_run(experiment: str, run_name: str, params: dict, tracking_uri: str | None = None) -> Iterator[object]:
    """Start an MLflow run in `experiment` with `params` logged; yields the active run."""
    import mlflow

    for noisy in ("alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    experiment, tags = run_context(experiment, uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tags, nested=mlflow.active_run() is not None) as run:
        mlflow.log_params({key: str(value)[:500] for key, value in params.items()})
        yield run


def artifact_location(uri: str) -> str | None:
    """Where new experiments of a sqlite store keep artifacts: `mlruns/` beside the database (None: the server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def ensure_experiment(name: str, uri: str) -> None:
    """Create experiment `name` in the store at `uri` unless it exists, with `artifact_location(uri)`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifact_location(uri))


def run_context(experiment: str, uri: str) -> tuple[str, dict[str, str]]:
    """(experiment, tags) for a new run of command `experiment`: its own experiment (created if missing), or,
    under a parent run (PARENT_RUN_ENV), the parent's experiment with the parent link and the command as tags."""
    from mlflow import MlflowClient

    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        ensure_experiment(experiment, uri)
        return experiment, {}
    client = MlflowClient(tracking_uri=uri)
    parent_experiment = client.get_experiment(client.get_run(parent).info.experiment_id).name
    return parent_experiment, {"mlflow.parentRunId": parent, "metanet.command": experiment}


def log_metrics(metrics: dict[str, float], prefix: str = "") -> None:
    import mlflow

    mlflow.log_metrics({f"{prefix}{key}": float(value) for key, value in metrics.items()})


def log_artifacts(*paths: str | Path) -> None:
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path))
