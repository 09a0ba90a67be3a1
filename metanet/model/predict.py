"""Predict a Partition for a whole checkpoint with a trained metanetwork.

Data-free (no corpus): each layer's weights go through the network once; the router is fitted on
the network's synthetic inputs. Data-aware (a corpus): calibration text gives each layer's neuron
statistics, which the network reads as extra node features (method `metanet-data`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from metanet.checkpoints import Checkpoint, open_checkpoint
from metanet.model.network import MetaNetwork
from metanet.partition import OperatingPoint, Partition
from metanet.partition.make import make_partition
from metanet.partition.methods import layer_calibrations


def calibrate(checkpoint: Checkpoint, corpus: str | None, n_tokens: int = 4096, seed: int = 0, source: str = "text"):
    """Calibration FFN inputs and neuron statistics of every layer, on the corpus's calibration text (corpus None:
    the default one) or, source "generated", on windows the model writes itself.   → ({index: LayerCalibration}, TextSplit)"""
    from metanet.calib import calibration_split, load_corpus, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(checkpoint)
    docs = load_corpus(corpus) if source != "generated" else None
    split = calibration_split(model, tokenizer, checkpoint.family.name, n_tokens, docs, source, seed)
    return layer_calibrations(checkpoint.layers(), split.ffn_inputs.layers), split


def predict_partition(
    checkpoint: str | Path | Checkpoint,
    point: OperatingPoint,
    net: MetaNetwork | None = None,
    corpus: str | None = None,
    calib_tokens: int = 4096,
    seed: int = 0,
    router: str | None = None,
    progress: Callable[[], None] | None = None,
    calibration: str = "text",
    device: torch.device | str = "cpu",
) -> Partition:
    """The metanetwork's Partition of `checkpoint`: data-aware when `corpus` is given or `calibration` is "generated"
    (windows the model writes itself), else data-free. `net` None: the shipped model. `router` None: the network's
    own; any router name of `metanet partition` works. `device`: where the network runs (layers are moved there)."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    point.expert_width(ckpt.d_ff)
    data_aware = bool(corpus) or calibration != "text"
    layers, split = calibrate(ckpt, corpus, calib_tokens, seed, calibration) if data_aware else (None, None)
    return make_partition(
        ckpt, "metanet-data" if data_aware else "metanet", point, router, calibration=layers, seed=seed,
        calib_tokens=split.n_tokens if split else 0, calib_seconds=split.seconds if split else 0.0, calib_source=calibration,
        progress=progress, metanetwork=net, device=device,
    )
