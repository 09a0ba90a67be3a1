"""Evaluate a Partition on a checkpoint's held-out text: per-layer metrics and whole-model quality."""

from __future__ import annotations

from typing import Callable

from metanet.calib.splits import TextSplit
from metanet.checkpoints import Checkpoint
from metanet.eval.metrics import layer_metrics, mean_over_layers
from metanet.eval.model_quality import dense_reference, model_quality
from metanet.partition.partition import Partition


def evaluate(
    checkpoint: Checkpoint,
    partition: Partition,
    heldout: TextSplit,
    model=None,
    reference=None,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Report of DESIGN.md's metrics: the layer means at top level, a `layers` list, run facts.

    Refuses a partition made for another checkpoint (per-layer fingerprints). `model`
    (the dense transformers model) adds ppl_ratio or embedding_cosine; pass its
    `dense_reference` on the held-out windows when evaluating many partitions.
    """
    partition.check_layer_count(checkpoint.n_layers)
    layers = []
    for layer in checkpoint.layers():
        partition.check_matches(layer.index, layer.fingerprint())
        point = partition.layer_point(layer.index)  # a plan's own point per block
        row = layer_metrics(layer, partition.layers[layer.index], point, heldout.ffn_inputs.layers[layer.index])
        layers.append({"index": layer.index, "active": point.active, **row})
        if progress:
            progress()
    report = {
        "method": partition.method,
        "router": partition.router,
        "experts": partition.point.experts,
        "active": partition.point.active,
        "shared": partition.point.shared,
        "planned": partition.planned,
        "compensated": partition.compensated,
        **mean_over_layers(layers),
        "convert_s": partition.info.get("convert_s"),
        "calib_tokens": partition.info.get("calib_tokens"),
        "heldout_tokens": heldout.n_tokens,
    }
    if model is not None:
        family = checkpoint.family.name
        if reference is None:
            reference = dense_reference(model, family, heldout.input_ids)
        report |= model_quality(model, family, partition, heldout.input_ids, reference)
    report["layers"] = layers
    return report
