"""Whole-model quality of an MoE conversion on held-out text.

Causal LMs:  ppl_ratio = exp(mean NLL_moe) / exp(mean NLL_dense) over the held-out windows.
Encoders:    embedding_cosine = mean over windows of cos(e_moe, e_dense), e = the mean-pooled
             last hidden state (how sentence-transformers embeds with all-MiniLM-L6-v2).
The dense side is computed once (`dense_reference`) and reused for every partition.
"""

from __future__ import annotations

import copy
import math

import torch

from metanet.calib.capture import ENCODER_FAMILIES
from metanet.moe.convert import convert
from metanet.partition.partition import Partition


@torch.no_grad()
def dense_reference(model, family: str, input_ids: torch.LongTensor, batch_size: int = 8) -> torch.Tensor:
    """Per-window mean NLL [N] (causal LMs) or embeddings [N, d] (encoders) of `model`."""
    return _outputs(model, family, input_ids, batch_size)


@torch.no_grad()
def model_quality(model, family: str, partition: Partition, input_ids: torch.LongTensor, reference: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """{"ppl_ratio": …} for causal LMs, {"embedding_cosine": …} for encoders.   input_ids: [N, L]"""
    moe_model = convert(copy.deepcopy(model), family, partition).eval()
    moe = _outputs(moe_model, family, input_ids, batch_size)
    if family in ENCODER_FAMILIES:
        return {"embedding_cosine": torch.nn.functional.cosine_similarity(moe, reference, dim=1).mean().item()}
    return {"ppl_ratio": math.exp(moe.mean().item() - reference.mean().item())}


def _outputs(model, family: str, input_ids: torch.LongTensor, batch_size: int) -> torch.Tensor:
    rows = []
    for batch in input_ids.split(batch_size):
        if family in ENCODER_FAMILIES:
            rows.append(model(input_ids=batch).last_hidden_state.mean(dim=1))  # [b, d]
        else:
            logits = model(input_ids=batch).logits[:, :-1]  # [b, L-1, V]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [b, L-1]
            rows.append(nll.mean(dim=1))
    return torch.cat(rows)
