"""GGUF files (llama.cpp) as a tensor source with a transformers-style config.

GGUF names its tensors `blk.{i}.ffn_up.weight` and keeps the model's hyper-parameters
in `{arch}.*` metadata. This module translates both to the transformers names and
layouts the family adapters already know, so a GGUF file is read like an HF folder.
Tensors are memory-mapped by `gguf.GGUFReader` and dequantised to float32 on read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metanet.errors import CheckpointError


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF architecture maps onto a transformers family."""

    model_type: str
    config_keys: dict[str, str]  # transformers config key → GGUF metadata key (without the `{arch}.` prefix)
    fixed_config: dict[str, object]
    block_tensors: dict[str, tuple[str, bool]]  # GGUF suffix in blk.{i} → (transformers name with {i}, transpose?)


_LLAMA_LIKE = dict(
    config_keys={
        "hidden_size": "embedding_length",
        "intermediate_size": "feed_forward_length",
        "num_hidden_layers": "block_count",
        "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    },
    fixed_config={"hidden_act": "silu"},
    block_tensors={
        "ffn_gate.weight": ("model.layers.{i}.mlp.gate_proj.weight", False),
        "ffn_up.weight": ("model.layers.{i}.mlp.up_proj.weight", False),
        "ffn_down.weight": ("model.layers.{i}.mlp.down_proj.weight", False),
        "ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", False),
    },
)

GGUF_ARCHS = {
    "llama": GGUFArch(model_type="llama", **_LLAMA_LIKE),
    "qwen2": GGUFArch(model_type="qwen2", **_LLAMA_LIKE),
    "qwen3": GGUFArch(model_type="qwen3", **_LLAMA_LIKE),
    "gpt2": GGUFArch(
        model_type="gpt2",
        config_keys={
            "n_embd": "embedding_length",
            "n_inner": "feed_forward_length",
            "n_layer": "block_count",
            "layer_norm_epsilon": "attention.layer_norm_epsilon",
        },
        fixed_config={"activation_function": "gelu_new"},
        block_tensors={  # GGUF stores GPT-2's Conv1D weights as [out, in]; transformers as [in, out]
            "ffn_up.weight": ("h.{i}.mlp.c_fc.weight", True),
            "ffn_up.bias": ("h.{i}.mlp.c_fc.bias", False),
            "ffn_down.weight": ("h.{i}.mlp.c_proj.weight", True),
            "ffn_down.bias": ("h.{i}.mlp.c_proj.bias", False),
            "ffn_norm.weight": ("h.{i}.ln_2.weight", False),
            "ffn_norm.bias": ("h.{i}.ln_2.bias", False),
        },
    ),
}

_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


class GGUFSource:
    format = "gguf"

    def __init__(self, path: Path):
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
            arch_name = str(reader.fields["general.architecture"].contents())
        except KeyError:
            raise CheckpointError(f"{path}: GGUF file without general.architecture") from None
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        arch = GGUF_ARCHS.get(arch_name)
        if arch is None:
            raise CheckpointError(f"{path}: unsupported GGUF architecture {arch_name!r}; supported: {', '.join(GGUF_ARCHS)}")
        self.config = {"model_type": arch.model_type, **arch.fixed_config}
        for hf_key, gguf_key in arch.config_keys.items():
            field = reader.fields.get(f"{arch_name}.{gguf_key}")
            if field is not None:
                value = field.contents()
                self.config[hf_key] = int(value) if isinstance(value, (int, np.integer)) else value
        self._tensors = {}  # name → (ReaderTensor, transpose)
        for tensor in reader.tensors:
            name, transpose = tensor.name, False
            match = _BLOCK_TENSOR.fullmatch(tensor.name)
            if match and match.group(2) in arch.block_tensors:
                pattern, transpose = arch.block_tensors[match.group(2)]
                name = pattern.format(i=match.group(1))
            self._tensors[name] = (tensor, transpose)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        tensor, transpose = self._tensors[name]
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGML lists the fastest dimension first
        return shape[::-1] if transpose else shape

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from gguf.quants import dequantize

        tensors = {}
        for name in names:
            tensor, transpose = self._tensors[name]
            array = dequantize(tensor.data, tensor.tensor_type).reshape(self.shape(name)[::-1] if transpose else self.shape(name))
            t = torch.from_numpy(np.array(array, dtype=np.float32))  # a private copy: the reader's arrays are memory-mapped
            tensors[name] = t.T.contiguous() if transpose else t
        return tensors
