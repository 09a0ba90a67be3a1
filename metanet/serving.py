"""The registered `metanet` model as an MLflow pyfunc, so `mlflow models serve` predicts partitions.

Request: one row per job, columns
    checkpoint (path or bundled alias), experts, active, shared (optional, 0), out (optional folder;
    default: a new folder under the system's temporary folder), corpus (optional: data-aware mode)
Response: one row per job: partition (the folder written), method, layers, convert_s.

    mlflow models serve -m models:/metanet/latest --env-manager local -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"checkpoint": "all-MiniLM-L6-v2", "experts": 16, "active": 4}]}'
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow.pyfunc

ARTIFACT = "metanet"


class MetanetPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from metanet.model.store import load_model

        self.net = load_model(context.artifacts[ARTIFACT])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from metanet.model.predict import predict_partition
        from metanet.partition import OperatingPoint

        rows = []
        for job in model_input.to_dict(orient="records"):
            point = OperatingPoint(int(job["experts"]), int(job["active"]), int(job.get("shared") or 0))
            corpus = job.get("corpus") or None
            partition = predict_partition(job["checkpoint"], point, self.net, corpus=corpus)
            out = Path(job.get("out") or tempfile.mkdtemp(prefix="metanet-partition-"))
            partition.save(out)
            rows.append({"partition": str(out), "method": partition.method, "layers": len(partition.layers), "convert_s": partition.info["convert_s"]})
        return pd.DataFrame(rows)


def log_pyfunc(model_folder: str | Path, registered_name: str | None = None):
    """Log the trained model folder as a pyfunc in the active MLflow run (and register it)."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name="model", python_model=MetanetPyfunc(), artifacts={ARTIFACT: str(model_folder)},
        registered_model_name=registered_name, pip_requirements=["metanet"],
    )
