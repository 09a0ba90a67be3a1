"""Family adapters: where each architecture keeps its FFN and how its config names things.

An adapter is data: tensor-name patterns relative to the checkpoint's prefix (`{i}` is
the block index) and the config keys for depth, widths, activation and norm. Adding a
family is adding one `Family(...)` to FAMILIES (and, if its config hides something,
a small subclass overriding `layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

from metanet.errors import CheckpointError

#: Config activation strings → canonical names of metanet.checkpoints.ffn_layer.ACTIVATIONS.
ACTIVATION_ALIASES = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}


@dataclass(frozen=True)
class Layout:
    """A family's layout resolved against one config.json."""

    n_layers: int
    d_model: int
    d_ff: int
    activation: str  # canonical
    norm_kind: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    patterns: dict[str, str]  # role (w_in, w_gate, w_out, b_in, b_out, norm.weight, norm.bias) → pattern


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    patterns: dict[str, str]  # role → name pattern; biases and norm bias only where the family has them
    n_layers_key: str
    d_model_key: str
    d_ff_key: str
    activation_key: str
    default_activation: str
    norm_kind: str
    eps_key: str | None
    default_eps: float
    transposed: bool = False  # GPT-2 Conv1D stores weights as [in, out]
    bias_flag: tuple[str, bool] | None = None  # config key switching biases on/off, and its default

    def layout(self, config: dict) -> Layout:
        patterns = dict(self.patterns)
        if self.bias_flag is not None and not config.get(*self.bias_flag):
            patterns.pop("b_in", None)
            patterns.pop("b_out", None)
        return Layout(
            n_layers=_int(config, self.n_layers_key),
            d_model=_int(config, self.d_model_key),
            d_ff=self.d_ff(config),
            activation=self.activation(config),
            norm_kind=self.norm_kind,
            norm_eps=float(config.get(self.eps_key, self.default_eps)) if self.eps_key else self.default_eps,
            patterns=patterns,
        )

    def d_ff(self, config: dict) -> int:
        return _int(config, self.d_ff_key)

    def activation(self, config: dict) -> str:
        raw = config.get(self.activation_key) or self.default_activation
        if raw not in ACTIVATION_ALIASES:
            raise CheckpointError(
                f"unsupported activation {raw!r} in config key {self.activation_key!r}; supported: {', '.join(sorted(ACTIVATION_ALIASES))}"
            )
        return ACTIVATION_ALIASES[raw]


class GPT2Family(Family):
    def d_ff(self, config: dict) -> int:  # n_inner is null for the default 4·d
        return int(config.get("n_inner") or 4 * _int(config, "n_embd"))


class OPTFamily(Family):
    def layout(self, config: dict) -> Layout:
        layout = super().layout(config)
        if config.get("do_layer_norm_before", True):
            return layout
        # Post-LN OPT (350m): the FFN reads the output of the attention block's norm.
        patterns = layout.patterns | {
            "norm.weight": "decoder.layers.{i}.self_attn_layer_norm.weight",
            "norm.bias": "decoder.layers.{i}.self_attn_layer_norm.bias",
        }
        return Layout(**{**layout.__dict__, "patterns": patterns})


class LlamaFamily(Family):
    def layout(self, config: dict) -> Layout:
        if config.get("mlp_bias"):
            raise CheckpointError(f"{config.get('model_type')} with mlp_bias=true is not supported (no bias on the linear gate branch in the canonical FFN)")
        return super().layout(config)


FAMILIES: tuple[Family, ...] = (
    GPT2Family(
        name="gpt2",
        model_types=("gpt2",),
        patterns={
            "w_in": "h.{i}.mlp.c_fc.weight", "b_in": "h.{i}.mlp.c_fc.bias",
            "w_out": "h.{i}.mlp.c_proj.weight", "b_out": "h.{i}.mlp.c_proj.bias",
            "norm.weight": "h.{i}.ln_2.weight", "norm.bias": "h.{i}.ln_2.bias",
        },
        n_layers_key="n_layer", d_model_key="n_embd", d_ff_key="n_inner",
        activation_key="activation_function", default_activation="gelu_new",
        norm_kind="layernorm", eps_key="layer_norm_epsilon", default_eps=1e-5,
        transposed=True,
    ),
    Family(
        name="bert",
        model_types=("bert",),
        patterns={
            "w_in": "encoder.layer.{i}.intermediate.dense.weight", "b_in": "encoder.layer.{i}.intermediate.dense.bias",
            "w_out": "encoder.layer.{i}.output.dense.weight", "b_out": "encoder.layer.{i}.output.dense.bias",
            # Post-LN: the FFN input is the output of the attention block's LayerNorm.
            "norm.weight": "encoder.layer.{i}.attention.output.LayerNorm.weight",
            "norm.bias": "encoder.layer.{i}.attention.output.LayerNorm.bias",
        },
        n_layers_key="num_hidden_layers", d_model_key="hidden_size", d_ff_key="intermediate_size",
        activation_key="hidden_act", default_activation="gelu",
        norm_kind="layernorm", eps_key="layer_norm_eps", default_eps=1e-12,
    ),
    OPTFamily(
        name="opt",
        model_types=("opt",),
        patterns={
            "w_in": "decoder.layers.{i}.fc1.weight", "b_in": "decoder.layers.{i}.fc1.bias",
            "w_out": "decoder.layers.{i}.fc2.weight", "b_out": "decoder.layers.{i}.fc2.bias",
            "norm.weight": "decoder.layers.{i}.final_layer_norm.weight",
            "norm.bias": "decoder.layers.{i}.final_layer_norm.bias",
        },
        n_layers_key="num_hidden_layers", d_model_key="hidden_size", d_ff_key="ffn_dim",
        activation_key="activation_function", default_activation="relu",
        norm_kind="layernorm", eps_key=None, default_eps=1e-5,
        bias_flag=("enable_bias", True),
    ),
    Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        patterns={
            "w_in": "layers.{i}.mlp.dense_h_to_4h.weight", "b_in": "layers.{i}.mlp.dense_h_to_4h.bias",
            "w_out": "layers.{i}.mlp.dense_4h_to_h.weight", "b_out": "layers.{i}.mlp.dense_4h_to_h.bias",
            "norm.weight": "layers.{i}.post_attention_layernorm.weight",
            "norm.bias": "layers.{i}.post_attention_layernorm.bias",
        },
        n_layers_key="num_hidden_layers", d_model_key="hidden_size", d_ff_key="intermediate_size",
        activation_key="hidden_act", default_activation="gelu",
        norm_kind="layernorm", eps_key="layer_norm_eps", default_eps=1e-5,
    ),
    LlamaFamily(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        patterns={
            "w_in": "layers.{i}.mlp.gate_proj.weight",  # activated branch
            "w_gate": "layers.{i}.mlp.up_proj.weight",  # linear multiplier
            "w_out": "layers.{i}.mlp.down_proj.weight",
            "norm.weight": "layers.{i}.post_attention_layernorm.weight",
        },
        n_layers_key="num_hidden_layers", d_model_key="hidden_size", d_ff_key="intermediate_size",
        activation_key="hidden_act", default_activation="silu",
        norm_kind="rmsnorm", eps_key="rms_norm_eps", default_eps=1e-6,
    ),
)

SUPPORTED_MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)


def family_for(config: dict) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise CheckpointError(
        f"unsupported architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _int(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"config.json: {key!r} must be a positive integer, found {value!r}")
    return value
