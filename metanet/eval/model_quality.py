"""Whole-model quality of an MoE conversion on held-out text.

Causal LMs:  ppl_ratio = exp(mean NLL_moe) / exp(mean NLL_dense) over the held-out windows.
Encoders:    embedding_cosine = mean over windows of cos(e_moe, e_dense), e = the mean-pooled
             last hidden state (how sentence-transformers embeds with all-MiniLM-L6-v2).
The dense side is computed once (`dense_reference`) and reused for every partition.

`per_block_quality` asks which blocks cost the most: the same measure with only block ℓ converted
(every other block dense), one forward over the windows per block.
"""

from __future__ import annotations

import copy
import math

import torch

from typing import Callable

from metanet.calib.capture import ENCODER_FAMILIES
from metanet.moe.convert import convert, dense_ffn_layers, install_block, model_blocks
from metanet.moe.module import MoEFFN
from metanet.partition.partition import Partition


@torch.no_grad()
def dense_reference(model, family: str, input_ids: torch.LongTensor, batch_size: int = 8) -> torch.Tensor:
    """Per-window mean NLL [N] (causal LMs) or embeddings [N, d] (encoders) of `model`."""
    return _outputs(model, family, input_ids, batch_size)


@torch.no_grad()
def model_quality(model, family: str, partition: Partition, input_ids: torch.LongTensor, reference: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """{"ppl_ratio": …} for causal LMs, {"embedding_cosine": …} for encoders.   input_ids: [N, L]"""
    moe_model = convert(copy.deepcopy(model), family, partition).eval()
    return quality_of(family, _outputs(moe_model, family, input_ids, batch_size), reference)


def quality_of(family: str, outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """{"ppl_ratio": …} or {"embedding_cosine": …} of a converted model's `dense_reference`-style outputs against the dense ones."""
    if family in ENCODER_FAMILIES:
        return {"embedding_cosine": torch.nn.functional.cosine_similarity(outputs.float(), reference.float(), dim=1).mean().item()}
    return {"ppl_ratio": math.exp(outputs.float().mean().item() - reference.float().mean().item())}


@torch.no_grad()
def per_block_quality(model, family: str, partition: Partition, input_ids: torch.LongTensor, reference: torch.Tensor,
                      batch_size: int = 8, progress: Callable[[], None] | None = None) -> list[dict[str, float]]:
    """For each block ℓ: `quality_of` the model with only block ℓ converted by `partition` (its own operating point and
    compensation), every other block dense; `progress()` after each block. `model` (dense) is left as it was.
    Refuses a partition made for other weights (fingerprints).   → one {"ppl_ratio"|"embedding_cosine": …} per block"""
    layers = dense_ffn_layers(model, family)
    partition.check_layer_count(len(layers))
    for layer in layers:
        partition.check_matches(layer.index, layer.fingerprint())
    blocks = model_blocks(model, family)
    rows = []
    for layer in layers:
        i, original = layer.index, blocks[layer.index]
        blocks[i] = copy.deepcopy(original)  # the MoE goes into a copy of the block; the original comes back after
        try:
            install_block(model, family, i, MoEFFN.from_layer(layer, partition.layers[i], partition.layer_point(i)))
            rows.append(quality_of(family, _outputs(model, family, input_ids, batch_size), reference))
        finally:
            blocks[i] = original
        if progress:
            progress()
    return rows


def _outputs(model, family: str, input_ids: torch.LongTensor, batch_size: int) -> torch.Tensor:
    """Per-window mean NLL [N] or mean-pooled embeddings [N, d], float32 on the CPU, whatever the model's device and dtype."""
    device = next(model.parameters()).device
    rows = []
    for batch in input_ids.split(batch_size):
        batch = batch.to(device)
        if family in ENCODER_FAMILIES:
            rows.append(model(input_ids=batch).last_hidden_state.float().mean(dim=1))  # [b, d]
        else:
            logits = model(input_ids=batch).logits[:, :-1].float()  # [b, L-1, V]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [b, L-1]
            rows.append(nll.mean(dim=1))
    return torch.cat(rows).cpu()
