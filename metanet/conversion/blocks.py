"""Walk a transformers model block by block on fixed token windows, as conversion needs it.

Sequential calibration (DESIGN.md "Data flow") converts block ℓ on the inputs that the already
converted blocks < ℓ produce. Running the whole model again for every block would cost L²/2
block passes; instead `BlockWalk` keeps the hidden states entering the next block for every
batch of windows, together with the arguments the model's own forward passed to its blocks
(attention mask, rotary embeddings, position ids: the same for every block), and runs one block
at a time:

    walk = BlockWalk(model, family, input_ids)     # runs the embeddings once: states entering block 0
    x = walk.ffn_inputs()                          # [T, d] FFN inputs of block walk.index (its outputs kept)
    ...                                            # fit a replacement FFN on x, install it in the block
    walk.advance(rerun=True)                       # run the block as it is now: states entering the next block
                                                   # (rerun=False: move on with the outputs ffn_inputs kept)

Rows of `ffn_inputs` follow input_ids.view(-1), as `metanet.calib.capture_ffn_inputs` orders them.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from metanet.calib.capture import ffn_input_modules
from metanet.errors import MetanetError
from metanet.moe.convert import model_blocks

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the block-0 hook: the rest of the forward pass is not needed."""


class BlockWalk:
    """The hidden states of fixed windows between two blocks of `model`, advanced one block at a time (module docstring)."""

    def __init__(self, model: torch.nn.Module, family: str, input_ids: torch.LongTensor, batch_size: int = 8,
                 progress: Callable[[int], None] | None = None):
        if input_ids.ndim != 2 or input_ids.numel() == 0:
            raise MetanetError(f"input_ids must be a non-empty [N, seq_len] tensor, got shape {list(input_ids.shape)}")
        self.model, self.family = model, family
        self.blocks = model_blocks(model, family)
        self.index = 0  # the block whose input the states are
        self._batches: list[tuple[tuple, dict]] = []  # per batch: (positional args with the states first, keyword args) of a block call
        self._outputs: list[torch.Tensor] | None = None  # per batch: block `index`'s outputs from ffn_inputs
        self.n_tokens = input_ids.numel()
        device = next(model.parameters()).device

        def keep(module, args, kwargs):
            args = args if args else (kwargs.pop("hidden_states"),)
            self._batches.append((tuple(args), dict(kwargs)))
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in input_ids.split(batch_size):
                    batch = batch.to(device)
                    try:
                        model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
                    except _Stop:
                        pass
                    if progress is not None:
                        progress(1)
        finally:
            handle.remove()

    @property
    def done(self) -> bool:
        return self.index >= len(self.blocks)

    def ffn_inputs(self) -> torch.Tensor:
        """Block `index`'s FFN inputs on every window (the block run as it is now, its outputs kept).   → [T, d] float32 CPU"""
        module = ffn_input_modules(self.model, self.family)[self.index]
        rows: list[torch.Tensor] = []

        def record(mod, args):
            rows.append(args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu", torch.float32))

        handle = module.register_forward_pre_hook(record)
        try:
            self._outputs = self._run()
        finally:
            handle.remove()
        return torch.cat(rows)

    def advance(self, rerun: bool = True) -> None:
        """Move the states past block `index`: run it as it is now (converted or not) on every batch, or with
        rerun=False take the outputs `ffn_inputs` kept (the block must not have changed since)."""
        if self.done:
            raise MetanetError(f"the walk is past the last of {len(self.blocks)} blocks")
        if not rerun and self._outputs is None:
            raise MetanetError("advance(rerun=False) needs ffn_inputs() of this block first")
        outputs = self._run() if rerun else self._outputs
        self._batches = [((states, *args[1:]), kwargs) for states, (args, kwargs) in zip(outputs, self._batches)]
        self._outputs = None
        self.index += 1

    def _run(self) -> list[torch.Tensor]:
        """Block `index` on every batch.   → its output hidden states, one [B, S, d] per batch"""
        block = self.blocks[self.index]
        with torch.no_grad():
            outputs = [block(*args, **kwargs) for args, kwargs in self._batches]
        return [out[0] if isinstance(out, tuple) else out for out in outputs]
