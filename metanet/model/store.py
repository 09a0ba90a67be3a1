"""Trained metanetworks on disk: a folder with `metanet.safetensors` (the weights) and `metanet.json`
({"format": 1, "config": MetaNetConfig fields, "training": free-form facts of the run}).

Where a model comes from (`load_model(spec)`):
    None / "shipped"        the model that ships inside the package (metanet/model/shipped/)
    a folder path           a folder written by `save_model` (e.g. `metanet train`'s output)
    "latest", "models:/…"   the model registry of the tracking server: "latest" is
                            models:/metanet/latest; the registered pyfunc carries the folder as an artifact
"""

from __future__ import annotations

import json
from pathlib import Path

from metanet.errors import MetanetError
from metanet.model.network import MetaNetConfig, MetaNetwork

FORMAT_VERSION = 1
WEIGHTS, META = "metanet.safetensors", "metanet.json"
SHIPPED = Path(__file__).parent / "shipped"
REGISTERED_NAME = "metanet"


def save_model(net: MetaNetwork, folder: str | Path, training: dict | None = None) -> Path:
    """Write the weights and config of `net` into `folder` (created); returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: value.detach().cpu().contiguous() for name, value in net.state_dict().items()}, folder / WEIGHTS)
    (folder / META).write_text(json.dumps({"format": FORMAT_VERSION, "config": net.config_dict(), "training": training or {}}, indent=2))
    return folder


def load_model(spec: str | Path | None = None, tracking_uri: str | None = None) -> MetaNetwork:
    """A MetaNetwork in eval mode from the shipped model, a folder or the registry (module docstring)."""
    from safetensors.torch import load_file

    folder = model_folder(spec, tracking_uri)
    try:
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise MetanetError(f"metanetwork {folder} has format {meta.get('format')!r}; this metanet reads format {FORMAT_VERSION}")
        net = MetaNetwork(MetaNetConfig(**meta["config"]))
        net.load_state_dict(load_file(folder / WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise MetanetError(f"cannot read the metanetwork in {folder}: {str(error).splitlines()[0]}") from None
    return net.eval()


def model_facts(spec: str | Path | None = None, tracking_uri: str | None = None) -> dict:
    """metanet.json of a model (config and training facts)."""
    return json.loads((model_folder(spec, tracking_uri) / META).read_text())


def model_folder(spec: str | Path | None, tracking_uri: str | None = None) -> Path:
    if spec is None or str(spec) == "shipped":
        folder = SHIPPED
        if not (folder / WEIGHTS).is_file():
            raise MetanetError("this installation ships no trained metanetwork; pass --model (a folder from `metanet train`)")
        return folder
    text = str(spec)
    if text == "latest" or text.startswith("models:/"):
        return _registry_folder(f"models:/{REGISTERED_NAME}/latest" if text == "latest" else text, tracking_uri)
    folder = Path(spec)
    if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
        raise MetanetError(f"{folder} is not a trained metanetwork (expected {WEIGHTS} and {META}; `metanet train` writes them)")
    return folder


def _registry_folder(uri: str, tracking_uri: str | None) -> Path:
    import mlflow

    from metanet.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as error:  # mlflow raises many types for a missing model or version
        raise MetanetError(f"cannot fetch {uri} from {resolve_tracking_uri(tracking_uri)}: {str(error).splitlines()[0]}") from None
    found = sorted(path.parent for path in local.rglob(META) if (path.parent / WEIGHTS).is_file())
    if not found:
        raise MetanetError(f"{uri} holds no metanetwork (no {META} with {WEIGHTS} among its artifacts)")
    return found[0]

