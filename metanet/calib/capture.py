"""Run a checkpoint on real text and record every FFN's input X.

X is what the canonical FFNLayer consumes: the output of the norm feeding the FFN, so
`layer.forward(X)` reproduces the model's own FFN output token for token. It is taken
with a forward pre-hook on the module that reads it in each block:

    gpt2      transformer.h[i].mlp              bert      encoder.layer[i].intermediate
    opt       decoder.layers[i].fc1             gpt_neox  layers[i].mlp
    llama     layers[i].mlp   (llama, mistral, qwen2, qwen3)
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from metanet.checkpoints import Checkpoint
from metanet.errors import MetanetError

log = logging.getLogger(__name__)

#: A folder holds a tokenizer when it has one of these files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")

#: Families whose checkpoints are encoders (loaded with AutoModel); all others are causal LMs.
ENCODER_FAMILIES = frozenset({"bert"})


@dataclass
class FFNInputs:
    """Every block's FFN input on the same T tokens (row t of each X is the same token)."""

    layers: dict[int, torch.Tensor]  # block index → X [T, d] float32, the FFN's input
    n_tokens: int  # T


def load_model_and_tokenizer(checkpoint: Checkpoint):
    """(model, tokenizer) of the checkpoint, loaded with transformers' Auto classes.

    Causal LMs load with AutoModelForCausalLM, encoders (bert) with AutoModel; float32, eval
    mode, local files only, no remote code. A folder needs its tokenizer files beside the
    weights. A GGUF file is loaded by transformers itself (`gguf_file=`): every tensor
    dequantised to float32 under its transformers name, the tokenizer built from the file's
    metadata; a GGUF file transformers cannot load (no tokenizer metadata, an architecture it
    does not know, a tensor its model needs missing) is a one-line MetanetError, never a model
    with randomly initialised weights. Running the model on text needs both model and
    tokenizer; data-free partition and predict need neither.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own progress bars report the work; stderr stays for errors

    model_class = AutoModel if checkpoint.family.name in ENCODER_FAMILIES else AutoModelForCausalLM
    if checkpoint.source.format == "gguf":
        model, tokenizer = _load_gguf(checkpoint.path, model_class)
        log.debug("loaded %s with %s (GGUF dequantised to float32)", checkpoint.path, type(model).__name__)
        return model.eval(), tokenizer
    folder = checkpoint.folder
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise MetanetError(f"{folder}: running the model on text (calibration, held-out metrics) needs a tokenizer in the checkpoint folder; "
                           "data-free partition and predict work without")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = model_class.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MetanetError(f"{folder}: transformers cannot load it ({str(exc).splitlines()[0]})") from None
    log.debug("loaded %s with %s", folder, type(model).__name__)
    return model.eval(), tokenizer


def _load_gguf(path: Path, model_class):
    """(model, tokenizer) of the GGUF file `path`, dequantised to float32 by transformers; MetanetError when it cannot."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report: a missing tensor is refused below, in one line
    try:
        with _quiet_gguf_conversion():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
            model, info = model_class.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True, output_loading_info=True,
            )
    except Exception as exc:  # transformers' GGUF reader raises ValueError, KeyError, ImportError, …: all mean "cannot load"
        reason = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MetanetError(f"{path}: transformers cannot load this GGUF file ({reason})") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    if info["missing_keys"]:  # transformers would run them randomly initialised
        missing = sorted(info["missing_keys"])
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MetanetError(f"{path}: transformers cannot load this GGUF file (missing tensor {missing[0]}{more} for {type(model).__name__})")
    return model, tokenizer


@contextmanager
def _quiet_gguf_conversion():
    """transformers dequantises GGUF tensors under a plain tqdm bar that `disable_progress_bar()` does not reach: switch it off."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support: from_pretrained says so
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def ffn_input_modules(model: torch.nn.Module, family: str) -> list[torch.nn.Module]:
    """The module whose (first positional) input is block i's FFN input, for every block i."""
    base = model.base_model  # the transformer without its LM head
    if family == "gpt2":
        return [block.mlp for block in base.h]
    if family == "bert":
        return [block.intermediate for block in base.encoder.layer]
    if family == "opt":
        return [block.fc1 for block in base.decoder.layers]
    if family in ("gpt_neox", "llama"):
        return [block.mlp for block in base.layers]
    raise MetanetError(f"no FFN capture for family {family!r}; supported: gpt2, bert, opt, gpt_neox, llama")


def capture_ffn_inputs(
    model: torch.nn.Module,
    family: str,
    input_ids: torch.LongTensor,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> FFNInputs:
    """Every block's FFN input X [T, d] for T = N·S tokens of input_ids [N, S], row order = input_ids.view(-1).

    Windows run through the model's base transformer (no LM head, no KV cache) batch_size at a
    time under torch.no_grad(), all positions attended (windows are full, no padding);
    `progress(1)` is called after each batch. X is returned in float32 on the CPU, preallocated
    so memory holds one copy: n_layers · T · d · 4 bytes.
    """
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise MetanetError(f"input_ids must be a non-empty [N, seq_len] tensor, got shape {list(input_ids.shape)}")
    modules = ffn_input_modules(model, family)
    n_windows, seq_len = input_ids.shape
    n_tokens = n_windows * seq_len
    device = next(model.parameters()).device
    d = model.config.hidden_size
    layers = {i: torch.empty(n_tokens, d, dtype=torch.float32) for i in range(len(modules))}  # each [T, d]
    cursor = [0]  # first token row of the batch being run

    def recorder(i: int):
        def hook(module, args):
            x = args[0].detach().reshape(-1, d)  # [B·S, d]
            layers[i][cursor[0] : cursor[0] + x.shape[0]] = x.to("cpu", torch.float32)

        return hook

    handles = [module.register_forward_pre_hook(recorder(i)) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            for start in range(0, n_windows, batch_size):
                batch = input_ids[start : start + batch_size].to(device)  # [B, S]
                cursor[0] = start * seq_len
                model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
                if progress is not None:
                    progress(1)
    finally:
        for handle in handles:
            handle.remove()
    log.info("captured FFN inputs of %d layers on %d tokens", len(layers), n_tokens)
    return FFNInputs(layers=layers, n_tokens=n_tokens)
