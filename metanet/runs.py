"""Read back the MLflow runs metanet commands logged: recent runs with key metrics, one run in full.

Works against any tracking URI MLflow's client accepts (a local `sqlite:///…` store, a
file store, or a tracking server `http://host:port`); the URI is resolved as in
`metanet.tracking.resolve_tracking_uri`. Problems a user can fix (no store yet, an
unknown experiment or run id, an unreachable server) raise `MetanetError` with one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from metanet.errors import MetanetError
from metanet.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)

#: Metrics worth a column in a listing, in display order. A metric is *key* when its
#: last dotted part is one of these (compare logs `kmeans.centroid.rel_error`, the zoo
#: `teacher.coact.rel_error`).
KEY_METRICS = (
    "rel_error", "oracle_rel_error", "router_recall", "mass_recall", "load_cv", "ppl_ratio", "embedding_cosine", "predicted_ppl_ratio",
    "heldout_loss", "train_loss", "convert_s", "size_mb", "speedup", "e2e_speedup",
)


@dataclass
class RunSummary:
    """One run as a listing shows it; `metrics` holds only its key metrics (KEY_METRICS order)."""

    run_id: str
    experiment: str
    name: str
    status: str
    start_time: datetime | None  # UTC
    metrics: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-ready: times as ISO 8601 strings."""
        out = dict(vars(self))
        out["start_time"] = _iso(self.start_time)
        return out


@dataclass
class RunDetails(RunSummary):
    """One run in full: every param and (latest) metric value, and every artifact path (files, recursively)."""

    end_time: datetime | None = None
    artifact_uri: str = ""
    params: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return super().to_dict() | {"end_time": _iso(self.end_time)}


def list_runs(experiment: str | None = None, limit: int = 20, tracking_uri: str | None = None) -> list[RunSummary]:
    """The `limit` most recently started runs, newest first, of one experiment or of every active one."""
    if limit < 1:
        raise MetanetError(f"--limit must be at least 1, got {limit}")
    client, uri = _client(tracking_uri)
    if experiment is None:
        experiments = _call(uri, client.search_experiments)
    else:
        found = _call(uri, client.get_experiment_by_name, experiment)
        if found is None:
            known = ", ".join(sorted(e.name for e in _call(uri, client.search_experiments))) or "none"
            raise MetanetError(f"no experiment named {experiment!r} in {uri} (experiments: {known})")
        experiments = [found]
    if not experiments:
        return []
    names = {e.experiment_id: e.name for e in experiments}
    runs = _call(uri, client.search_runs, list(names), max_results=limit, order_by=["attributes.start_time DESC"])
    return [
        RunSummary(run.info.run_id, names[run.info.experiment_id], run.info.run_name or "", run.info.status,
                   _time(run.info.start_time), key_metrics(run.data.metrics))
        for run in runs
    ]


def show_run(run_id: str, tracking_uri: str | None = None) -> RunDetails:
    """Everything one run holds; raises MetanetError for a run id the store does not know."""
    from mlflow.exceptions import MlflowException

    client, uri = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise MetanetError(f"no run {run_id!r} in {uri} (list them with `metanet runs`)") from None
        raise _store_error(uri, exc) from None
    experiment = _call(uri, client.get_experiment, run.info.experiment_id)
    return RunDetails(
        run.info.run_id, experiment.name, run.info.run_name or "", run.info.status, _time(run.info.start_time),
        dict(sorted(run.data.metrics.items())),
        end_time=_time(run.info.end_time), artifact_uri=run.info.artifact_uri,
        params=dict(sorted(run.data.params.items())), artifacts=_call(uri, _artifact_paths, client, run.info.run_id),
    )


def key_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics whose last dotted part is in KEY_METRICS, in that order (then by name)."""
    rank = {name: i for i, name in enumerate(KEY_METRICS)}
    keys = [k for k in metrics if k.rsplit(".", 1)[-1] in rank]
    return {k: metrics[k] for k in sorted(keys, key=lambda k: (rank[k.rsplit(".", 1)[-1]], k))}


def _client(tracking_uri: str | None):
    """(MlflowClient, resolved URI). A local sqlite store that does not exist yet is an error, not created."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise MetanetError(f"no MLflow store at {path}: nothing was tracked here yet (pass --tracking-uri or set MLFLOW_TRACKING_URI)")
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    for noisy in ("alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log.debug("reading runs from %s", uri)
    return MlflowClient(tracking_uri=uri), uri


def _check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at once, instead of after MLflow's minutes of retries, when nothing answers at a server URI.

    Any HTTP answer counts as a server (an auth proxy may refuse /health); MLflow's client
    then reports what it finds.
    """
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MetanetError(f"no MLflow server answers at {uri} ({reason}); start one with `mlflow server` or fix --tracking-uri / MLFLOW_TRACKING_URI") from None


def _call(uri: str, function, *args, **kwargs):
    """function(*args, **kwargs) with MLflow's failures (server down, broken store) as one-line MetanetErrors."""
    from mlflow.exceptions import MlflowException

    try:
        return function(*args, **kwargs)
    except MlflowException as exc:
        raise _store_error(uri, exc) from None


def _store_error(uri: str, exc: Exception) -> MetanetError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return MetanetError(f"cannot read MLflow runs from {uri}: {first_line}")


def _artifact_paths(client, run_id: str, folder: str | None = None) -> list[str]:
    paths = []
    for entry in client.list_artifacts(run_id, folder):
        paths.extend(_artifact_paths(client, run_id, entry.path) if entry.is_dir else [entry.path])
    return paths


def _time(millis: int | None) -> datetime | None:
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc) if millis else None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None
