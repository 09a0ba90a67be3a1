"""Predict a Partition for a whole checkpoint with a trained metanetwork.

Data-free (no corpus): each layer's weights go through the network once; the router is fitted on
the network's synthetic inputs. Data-aware (a corpus): calibration text gives each layer's neuron
statistics, which the network reads as extra node features (method `metanet-data`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from metanet.checkpoints import Checkpoint, open_checkpoint
from metanet.model.network import MetaNetwork
from metanet.partition import OperatingPoint, Partition
from metanet.partition.make import make_partition
from metanet.partition.methods import layer_calibrations


def calibrate(checkpoint: Checkpoint, corpus: str | None, n_tokens: int = 4096, seed: int = 0):
    """Calibration FFN inputs and neuron statistics of every layer (corpus None: the default one).
    → ({index: LayerCalibration}, TextSplit)"""
    from metanet.calib import load_corpus, load_model_and_tokenizer, text_split

    model, tokenizer = load_model_and_tokenizer(checkpoint)
    split = text_split(model, tokenizer, checkpoint.family.name, "calibration", n_tokens, load_corpus(corpus), seed=seed)
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
) -> Partition:
    """The metanetwork's Partition of `checkpoint` (data-aware when `corpus` is given; "" or None: data-free).
    `net` None: the shipped model. `router` None: the network's own; any router name of `metanet partition` works."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    point.expert_width(ckpt.d_ff)
    calibration, split = calibrate(ckpt, corpus, calib_tokens, seed) if corpus else (None, None)
    return make_partition(
        ckpt, "metanet-data" if calibration else "metanet", point, router, calibration=calibration, seed=seed,
        calib_tokens=split.n_tokens if split else 0, calib_seconds=split.seconds if split else 0.0,
        progress=progress, metanetwork=net,
    )
