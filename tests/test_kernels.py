"""The MoE runtime paths (metanet/kernels) against the float32 reference, on real tiny models.

The path tests run on DEVICE: the GPU where there is one (every path as it runs there: compiled
Triton, torch._grouped_mm on CUDA), else the CPU, where the Triton decode kernels run under
TRITON_INTERPRET=1 (set in conftest.py), so their arithmetic is tested on every run. The tests
marked needs_cuda add what only a GPU has (CUDA graphs, a wide layer, a loaded checkpoint).
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metanet.errors import MetanetError
from metanet.kernels import PATHS, choose_path, moe_output
from metanet.kernels.dispatch import DECODE_MAX_TOKENS, DENSE_MAX_TOKENS, DENSE_MIN_UNION, cuda_path
from metanet.kernels.grouped import grouped_matmul
from metanet.moe import MoEFFN, convert, dense_ffn_layers, moe_forward
from tests_support import make_point, random_partition, relative

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

# (model type, activation it exercises): gated silu, gelu_tanh with biases, exact gelu with biases, relu
FAMILIES = [("llama", "silu"), ("gpt2", "gelu_tanh"), ("bert", "gelu"), ("opt", "relu")]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # relative error against the float32 reference


def moe_layer(tiny, active: int, pad_to: int = 1, seed: int = 0):
    """(dense FFNLayer, its LayerPartition, the MoEFFN) of block 0 of a tiny model."""
    layer = dense_ffn_layers(tiny.model, tiny.family)[0]
    point = make_point(tiny.d_ff, active=active)
    lp = random_partition([layer], point, seed=seed).layers[0]
    return layer, lp, MoEFFN.from_layer(layer, lp, point, pad_to=pad_to)


def paths_for(n_tokens: int) -> list[str]:
    """Every path that takes n_tokens tokens here (decode: at most 16, and Triton needed)."""
    return [p for p in PATHS if p != "decode" or (n_tokens <= DECODE_MAX_TOKENS and HAS_TRITON)]


def device_tokens(n_tokens: int, d: int, seed: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("model_type,activation", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_tokens", [1, 3, 11, 40])
def test_every_path_equals_the_float32_reference(tiny_models, model_type, activation, dtype, n_tokens):
    tiny = tiny_models[model_type]
    layer, lp, moe = moe_layer(tiny, active=3, seed=n_tokens)
    assert layer.activation == activation
    x = device_tokens(n_tokens, tiny.d_model, seed=1)
    mask = moe.route(x)  # [T, E]
    expected = moe_forward(layer, lp.assign, mask, x)  # float32, dense arithmetic
    moe = moe.to(DEVICE, dtype)

    for path in paths_for(n_tokens):
        moe.kernel = path
        with torch.no_grad():
            y = moe.forward_with_mask(x.to(DEVICE, dtype), mask.to(DEVICE))
        assert y.dtype == dtype
        assert relative(y.float().cpu(), expected) <= TOLERANCE[dtype], path


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_every_path_with_all_experts_is_the_dense_ffn_with_none_is_b_out_and_padding_changes_nothing(tiny_models, model_type):
    tiny = tiny_models[model_type]
    layer, _, moe = moe_layer(tiny, active=tiny.d_ff // 8, pad_to=64)  # k = E; m = 8 padded to 64
    assert moe.expert_width == 64
    moe = moe.to(DEVICE)
    for n_tokens in (2, 17):
        x = device_tokens(n_tokens, tiny.d_model, seed=n_tokens)
        nothing = torch.zeros(n_tokens, moe.n_experts, dtype=torch.bool, device=DEVICE)
        bias_only = torch.zeros_like(x) if layer.b_out is None else layer.b_out.expand_as(x)
        for path in paths_for(n_tokens):
            moe.kernel = path
            with torch.no_grad():
                torch.testing.assert_close(moe(x.to(DEVICE)).cpu(), layer.forward(x), rtol=1e-5, atol=1e-5, msg=path)
                torch.testing.assert_close(moe.forward_with_mask(x.to(DEVICE), nothing).cpu(), bias_only, msg=path)  # no expert: b_out alone


def test_decode_and_grouped_never_read_the_weights_of_unselected_experts(tiny_models):
    tiny = tiny_models["llama"]
    layer, lp, moe = moe_layer(tiny, active=2)
    x = device_tokens(2, tiny.d_model, seed=3)
    mask = moe.route(x)
    unused = (~mask.any(0)).nonzero().squeeze(1)
    assert unused.numel() > 0
    expected = moe_forward(layer, lp.assign, mask, x)
    moe, x, mask = moe.to(DEVICE), x.to(DEVICE), mask.to(DEVICE)
    with torch.no_grad():
        for weight in (moe.w_in, moe.w_gate, moe.w_out):
            weight[unused] = float("nan")  # anything that multiplied them would turn NaN

        for path in [p for p in paths_for(2) if p != "dense"]:
            moe.kernel = path
            torch.testing.assert_close(moe.forward_with_mask(x, mask).cpu(), expected, rtol=1e-5, atol=1e-5, msg=path)
        moe.kernel = "dense"  # the dense path reads every weight: it is only chosen when most are needed anyway
        assert moe.forward_with_mask(x, mask).isnan().all()


@needs_triton
@pytest.mark.parametrize("model_type,shared", [("llama", 0), ("gpt_neox", 2)])
def test_decode_routes_inside_its_kernel_as_the_router_does(tiny_models, model_type, shared):
    tiny = tiny_models[model_type]
    layer = dense_ffn_layers(tiny.model, tiny.family)[0]
    point = make_point(tiny.d_ff, active=4, shared=shared)
    lp = random_partition([layer], point, seed=7).layers[0]
    moe = MoEFFN.from_layer(layer, lp, point)
    on_device = copy.deepcopy(moe).to(DEVICE)
    for seed, n_tokens in enumerate((1, 2, 4, 7, DECODE_MAX_TOKENS)):
        x = device_tokens(n_tokens, tiny.d_model, seed=seed)
        expected = moe_forward(layer, lp.assign, moe.route(x), x)  # b_out included
        with torch.no_grad():
            torch.testing.assert_close(moe_output(on_device, x.to(DEVICE), None, "decode").cpu(), expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_decode_reuses_launches_only_for_layers_of_the_same_kind(tiny_models):
    # decode caches its launches by token count and layer kind: layers that differ only in gate, biases,
    # activation, routing or weight dtype, called in turn, must each get their own
    _, _, gated = moe_layer(tiny_models["llama"], active=3)
    g = torch.Generator().manual_seed(4)
    E, m, d = gated.w_in.shape
    plain = MoEFFN(gated.w_in.detach(), gated.w_out.detach(), gated.router_weight.detach(), gated.router_bias.detach(), gated.order,
                   make_point(E * m, active=2, shared=1), "gelu", b_in=torch.randn(E, m, generator=g), b_out=torch.randn(d, generator=g))
    layers = [gated, plain, copy.deepcopy(plain).to(torch.bfloat16)]
    x = device_tokens(3, d, seed=6)
    with torch.no_grad():
        for _ in range(2):
            for layer in layers:
                on_device, tokens = layer.to(DEVICE), x.to(DEVICE, layer.w_in.dtype)
                mask = on_device.route(tokens)
                for routing in (None, mask):
                    y = moe_output(on_device, tokens, routing, "decode").float()
                    reference = moe_output(on_device, tokens, mask, "reference").float()
                    assert relative(y.cpu(), reference.cpu()) <= TOLERANCE[layer.w_in.dtype], (layer, routing is None)


@needs_triton
def test_decode_runs_with_the_tiling_the_layer_carries(tiny_models):
    from triton.errors import TritonError

    from metanet.kernels.decode import Tiling

    _, _, moe = moe_layer(tiny_models["llama"], active=3)
    moe = moe.to(DEVICE)
    x = device_tokens(2, moe.d_model, seed=0, device=DEVICE)
    expected = moe_output(moe, x, None, "reference")
    with torch.no_grad():
        moe.decode_tiling = Tiling(up_block=(16, 64), down_block=(16, 64), num_warps=2, num_stages=2)
        torch.testing.assert_close(moe_output(moe, x, None, "decode"), expected, rtol=1e-5, atol=1e-5)
        moe.decode_tiling = Tiling(up_block=(24, 64))  # Triton refuses blocks that are not powers of two: this tiling is the one that runs
        with pytest.raises(TritonError):
            moe_output(moe, x, None, "decode")


@needs_triton
def test_decode_kernels_compile_for_hopper_with_16_byte_weight_loads_and_no_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter's
    run = subprocess.run([sys.executable, "-m", "benchmarks.decode_sass", "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    facts = json.loads(run.stdout)

    assert [f["kernel"] for f in facts] == ["_score_kernel", "_up_kernel", "_down_kernel"] * 2
    for kernel in facts:
        assert kernel["local"] == 0 and kernel["stack"] == 0, kernel  # no local-memory arrays, no register spills
        if kernel["kernel"] == "_score_kernel":  # router rows arrive 16 bytes per instruction
            assert kernel["instructions"].get("LDG.E.128", 0) > 0, kernel
        else:  # weights arrive 16 bytes per instruction, asynchronously
            assert kernel["instructions"].get("LDGSTS.E.BYPASS.128", 0) > 0, kernel


@pytest.mark.parametrize("n_rows,width", [(24, 32), (24, 6)])  # aligned rows (torch._grouped_mm) and not (per-expert matmuls)
def test_grouped_matmul_multiplies_each_segment_by_its_expert(n_rows, width):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n_rows, width, generator=g)
    w = torch.randn(3, 16, width, generator=g)  # [E, n, K]
    counts = torch.tensor([5, 0, n_rows - 5])  # an expert no row selected

    z = grouped_matmul(a, w, counts)

    torch.testing.assert_close(z, torch.cat([a[:5] @ w[0].T, a[5:] @ w[2].T]), rtol=1e-5, atol=1e-5)


def test_paths_run_inside_a_converted_model(tiny_models):
    tiny = tiny_models["llama"]
    layers = dense_ffn_layers(tiny.model, tiny.family)
    point = make_point(tiny.d_ff, active=3)
    model = convert(copy.deepcopy(tiny.model), tiny.family, random_partition(layers, point, seed=2)).to(DEVICE)
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        logits = {}
        for path in paths_for(4):
            for module in model.modules():
                if isinstance(module, MoEFFN):
                    module.kernel = path
            logits[path] = model(input_ids=ids).logits
    for path, value in logits.items():
        torch.testing.assert_close(value, logits["reference"], rtol=1e-4, atol=1e-4, msg=path)


def test_gradients_flow_through_the_default_path(tiny_models):
    tiny = tiny_models["llama"]
    _, _, moe = moe_layer(tiny, active=3)
    x = device_tokens(4, tiny.d_model, seed=5).requires_grad_()

    moe(x).square().sum().backward()

    assert x.grad is not None and moe.w_in.grad is not None and moe.w_in.grad.abs().sum() > 0


def test_cpu_calls_take_the_grouped_path_and_autograd_the_reference(tiny_models):
    tiny = tiny_models["llama"]
    _, _, moe = moe_layer(tiny, active=3)
    x = device_tokens(5, tiny.d_model, seed=0)
    routed = lambda: moe.route(x)  # noqa: E731
    assert choose_path(moe, x, routed) == "reference"  # parameters require grad, grad mode on
    with torch.no_grad():
        assert choose_path(moe, x, routed) == "grouped"


@needs_triton
def test_cuda_path_choice_follows_token_count_and_expert_union():
    union_never_asked = lambda: pytest.fail("decode must choose without synchronising")  # noqa: E731
    assert cuda_path(1, union_never_asked) == "decode"
    assert cuda_path(DECODE_MAX_TOKENS, union_never_asked) == "decode"
    assert cuda_path(DECODE_MAX_TOKENS + 1, lambda: 1.0) == "dense"
    assert cuda_path(DENSE_MAX_TOKENS, lambda: DENSE_MIN_UNION - 0.01) == "grouped"
    assert cuda_path(DENSE_MAX_TOKENS + 1, lambda: 1.0) == "grouped"
    # inside CUDA-graph capture nothing may synchronise: the same decode, dense beyond it
    assert cuda_path(DECODE_MAX_TOKENS, union_never_asked, capturing=True) == "decode"
    assert cuda_path(DECODE_MAX_TOKENS + 1, union_never_asked, capturing=True) == "dense"
    assert cuda_path(DENSE_MAX_TOKENS + 1, union_never_asked, capturing=True) == "dense"


def test_bad_paths_and_too_many_decode_tokens_are_clear_errors(tiny_models):
    tiny = tiny_models["llama"]
    _, _, moe = moe_layer(tiny, active=3)
    x = device_tokens(DECODE_MAX_TOKENS + 1, tiny.d_model, seed=0)
    with pytest.raises(MetanetError, match="unknown MoE kernel path 'fast'; known: auto, reference"):
        moe_output(moe, x, None, "fast")
    if HAS_TRITON:
        with pytest.raises(MetanetError, match="at most 16 tokens, got 17"):
            moe_output(moe, x, None, "decode")


# -- on a GPU ---------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("n_tokens", [1, 2, 4, 8, 64, 300])
def test_cuda_bfloat16_default_path_is_within_one_percent_of_float32(tiny_models, n_tokens):
    tiny = tiny_models["llama"]
    layer, lp, moe = moe_layer(tiny, active=3, pad_to=64)
    x = device_tokens(n_tokens, tiny.d_model, seed=n_tokens)
    mask = moe.route(x)
    expected = moe_forward(layer, lp.assign, mask, x)
    moe = moe.to("cuda", torch.bfloat16)

    with torch.inference_mode():
        y = moe.forward_with_mask(x.to("cuda", torch.bfloat16), mask.cuda())

    assert relative(y.float().cpu(), expected) <= 1e-2


@needs_cuda
@pytest.mark.parametrize("n_tokens", [1, 8, 40])
def test_cuda_graph_captures_the_default_path_and_replays_the_eager_result(tiny_models, n_tokens):
    tiny = tiny_models["llama"]
    _, _, moe = moe_layer(tiny, active=3, pad_to=64)
    moe = moe.to("cuda", torch.bfloat16).requires_grad_(False)
    x = device_tokens(n_tokens, tiny.d_model, seed=n_tokens, device="cuda").to(torch.bfloat16)
    eager = moe(x)  # also compiles what the capture records (T = 40: dense in capture, chosen by the union here)
    moe_output(moe, x, None, "dense")
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails if the path synchronises with the host
        captured = moe(x)
    graph.replay()
    torch.cuda.synchronize()

    assert relative(captured.float(), eager.float()) <= 1e-2


@needs_cuda
@needs_triton
def test_cuda_decode_kernel_equals_reference_on_a_wide_layer():
    from metanet.checkpoints import FFNLayer
    from metanet.partition import LayerPartition, OperatingPoint

    g = torch.Generator().manual_seed(0)
    d, f, point = 512, 2048, OperatingPoint(16, 4, 0)
    layer = FFNLayer(w_in=torch.randn(f, d, generator=g) / d**0.5, w_gate=torch.randn(f, d, generator=g) / d**0.5,
                     w_out=torch.randn(d, f, generator=g) / f**0.5, activation="silu")
    lp = LayerPartition(torch.randperm(f, generator=g) % 16, torch.randn(16, d, generator=g), torch.zeros(16))
    moe = MoEFFN.from_layer(layer, lp, point, pad_to=64).to("cuda")
    inputs = [torch.randn(n, d, generator=g).cuda() for n in range(1, DECODE_MAX_TOKENS + 1)]
    masks = [moe.route(x) for x in inputs]
    with torch.inference_mode():
        references = [moe_output(moe, x, mask, "reference") for x, mask in zip(inputs, masks)]  # float32
        moe = moe.to(torch.bfloat16)
        for x, mask, reference in zip(inputs, masks, references):
            assert relative(moe_output(moe, x.to(torch.bfloat16), mask, "decode").float(), reference) <= 1e-2
            assert relative(moe_output(moe, x.to(torch.bfloat16), None, "decode").float(), reference) <= 1e-2  # its own routing


@needs_cuda
def test_loaded_moe_checkpoint_runs_and_generates_on_cuda_as_on_cpu(tiny_models, tmp_path):
    from metanet.checkpoints import open_checkpoint
    from metanet.moe import apply, load

    tiny = tiny_models["llama"]
    checkpoint = open_checkpoint(tiny.path)
    apply(checkpoint, random_partition(list(checkpoint.layers()), make_point(tiny.d_ff, active=3)), tmp_path / "moe")
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    on_cpu, on_cuda = load(tmp_path / "moe"), load(tmp_path / "moe", device="cuda")

    with torch.no_grad():  # prefill: 5 tokens (dense or grouped); then one token at a time (decode)
        assert relative(on_cuda(input_ids=ids.cuda()).logits.cpu(), on_cpu(input_ids=ids).logits) <= 1e-2
    generated = on_cuda.generate(ids.cuda(), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 11)
