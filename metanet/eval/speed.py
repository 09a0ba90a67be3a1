"""Speed of an MoE checkpoint against the dense model it came from, on one device (`metanet bench`).

FFN layers: for every T in `tokens`, each block's MoEFFN (the path `metanet.kernels` chooses) and
the dense FFN it was carved from (`MoEFFN.to_ffn_layer`: same weights, device and dtype) run on
T real FFN inputs — captured by the MoE model itself on held-out text, so the routing is the
checkpoint's own on real text. A transformers export (`metanet export`) is timed the same way, each
block's GLM-4-MoE module against the source's dense FFN (`TimedBlock`). The model's FFN time at T is
the sum over blocks, and

    speed-up(T) = dense FFN time / MoE FFN time        (> 1: the MoE is faster)

End to end: causal LMs generate `new_tokens` tokens greedily from a held-out prompt (batch 1),
with transformers' generate and as decode steps alone on a static KV cache (on CUDA each step one
CUDA-graph replay: what serving stacks run); encoders run a forward over [8, 128] held-out
windows. Tokens/s of the MoE model and of its dense source (the folder its config names, or
`dense=`); without a source only the MoE is timed.

Times are medians over repeated passes of several calls each (`per_call_ms`): CUDA events on a
GPU, the wall clock on a CPU.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from metanet.device import resolve_device
from metanet.errors import MetanetError

log = logging.getLogger(__name__)

CALLS = 8  # calls per timed pass, each on other tokens
REPEATS = 5  # timed passes; the median counts
PROMPT_TOKENS = 16
ENCODER_BATCH = (8, 128)  # windows × tokens of the encoder forward


def per_call_ms(call: Callable[[int], object], calls: int, repeats: int, device: torch.device, graph: bool = False) -> float:
    """Milliseconds per call of call(0), …, call(calls − 1) run back to back: median over `repeats` passes.

    One untimed pass first (kernels compile, the allocator warms up). CUDA: events around each pass,
    calls queued without synchronisation, so a call costs the larger of its GPU time and its host
    launch time; graph=True captures the pass as one CUDA graph and times its replays (GPU time
    only; every call must be free of host synchronisation). CPU: time.perf_counter.
    """

    def one_pass() -> None:
        for i in range(calls):
            call(i)

    one_pass()
    if device.type != "cuda":  # a CPU call takes the host's time
        return host_ms_per_call(call, calls, repeats, device)
    run = one_pass
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            one_pass()
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            one_pass()
        run = cuda_graph.replay
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def host_ms_per_call(call: Callable[[int], object], calls: int, repeats: int, device: torch.device) -> float:
    """Host milliseconds to issue one call of call(0), …, call(calls − 1): median over `repeats` passes, each timed
    from an idle device until its last call returns, without waiting for the GPU to finish (a pass's launches fit
    in CUDA's launch queue). An eager call whose host time exceeds its GPU time is bound by the host. After
    per_call_ms has warmed the calls up. On a CPU this is the wall-clock time per call."""
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        for i in range(calls):
            call(i)
        times.append((time.perf_counter() - start) * 1e3 / calls)
    _synchronize(device)
    return statistics.median(times)


@dataclass
class TimedBlock:
    """One block's dense FFN and the MoE that replaces it, timed on the same inputs by `ffn_speed`."""

    dense: Callable[[torch.Tensor], torch.Tensor]  # [T, d] → [T, d]
    moe: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype  # of the inputs both take
    path: Callable[[torch.Tensor], str]  # the path the MoE takes for these inputs
    graphable: bool  # whether a CUDA graph may capture the MoE's calls


def metanet_block(moe) -> TimedBlock:
    """A metanet MoEFFN against the dense FFN it was carved from (`to_ffn_layer`: same weights, device and dtype)."""
    from metanet.kernels import choose_path

    auto = moe.kernel == "auto"
    return TimedBlock(moe.to_ffn_layer().forward, moe, moe.w_in.dtype,
                      (lambda w: choose_path(moe, w, lambda: moe.route(w))) if auto else (lambda w: moe.kernel), auto)


def ffn_speed(blocks: list[TimedBlock], inputs: dict[int, torch.Tensor], tokens: list[int], device: torch.device,
              progress: Callable[[], None] | None = None) -> list[dict]:
    """One row per T: summed dense and MoE FFN milliseconds over the blocks, the speed-up and the paths taken.

    inputs: block → its FFN inputs [N, d] (N ≥ max(tokens)).
    Call i of a pass runs tokens [i·T, (i+1)·T) of the block's inputs (wrapping), so calls route differently.
    On CUDA, for T ≤ DECODE_MAX_TOKENS (where no metanet path synchronises with the host), the rows also hold the
    pass replayed as one CUDA graph (`dense_graph_ms`, `moe_graph_ms`, `graph_speedup`): GPU time alone,
    as serving stacks run decode steps. `progress()` is called after each (block, T).
    """
    from metanet.kernels.dispatch import DECODE_MAX_TOKENS

    graphs = [t for t in tokens if device.type == "cuda" and t <= DECODE_MAX_TOKENS and all(b.graphable for b in blocks)]
    times = {key: dict.fromkeys(tokens, 0.0) for key in ("dense_ms", "moe_ms", "dense_graph_ms", "moe_graph_ms")}  # T → summed over blocks
    paths = {n_tokens: Counter() for n_tokens in tokens}
    for i, block in enumerate(blocks):
        pool = inputs[i]
        for n_tokens in tokens:
            windows = [pool[(j * n_tokens + torch.arange(n_tokens)) % pool.shape[0]].to(device, block.dtype) for j in range(CALLS)]  # each [T, d]
            calls = {"dense": lambda j: block.dense(windows[j]), "moe": lambda j: block.moe(windows[j])}
            with torch.inference_mode():
                for name, call in calls.items():
                    times[f"{name}_ms"][n_tokens] += per_call_ms(call, CALLS, REPEATS, device)
                    if n_tokens in graphs:
                        times[f"{name}_graph_ms"][n_tokens] += per_call_ms(call, CALLS, REPEATS, device, graph=True)
                paths[n_tokens].update(block.path(w) for w in windows)
            if progress is not None:
                progress()
    rows = []
    for t in tokens:
        row = {"tokens": t, "dense_ms": times["dense_ms"][t], "moe_ms": times["moe_ms"][t], "speedup": times["dense_ms"][t] / times["moe_ms"][t],
               "paths": dict(paths[t])}
        if t in graphs:
            row |= {"dense_graph_ms": times["dense_graph_ms"][t], "moe_graph_ms": times["moe_graph_ms"][t],
                    "graph_speedup": times["dense_graph_ms"][t] / times["moe_graph_ms"][t]}
        rows.append(row)
        log.info("T=%d: dense %.4f ms, MoE %.4f ms (%.2f×), paths %s", t, row["dense_ms"], row["moe_ms"], row["speedup"], row["paths"])
    return rows


def model_speed(model, input_ids: torch.Tensor, new_tokens: int | None, device: torch.device, repeats: int = 3) -> dict:
    """Tokens/s of a causal LM generating `new_tokens` greedily per sequence after input_ids [B, P] (B × new_tokens
    tokens), or of an encoder's forward over input_ids [B, S] (new_tokens None; B × S tokens).
    Median of `repeats` runs after a warm-up run; wall clock, the device synchronised around each run."""
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids)

    def run() -> None:
        if new_tokens is None:
            model(input_ids=input_ids, attention_mask=attention_mask)
        else:
            out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=model.generation_config.pad_token_id or 0)
            if out.shape[1] != input_ids.shape[1] + new_tokens:
                raise MetanetError(f"generate stopped after {out.shape[1] - input_ids.shape[1]} of {new_tokens} new tokens")

    def seconds() -> float:
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        seconds()
        median = statistics.median(seconds() for _ in range(repeats))
    produced = input_ids.numel() if new_tokens is None else input_ids.shape[0] * new_tokens
    return {"seconds": median, "tokens_per_s": produced / median}


def check_counts(tokens: list[int], new_tokens: int) -> None:
    """MetanetError unless every token count and the number of generated tokens is a positive integer."""
    if not tokens or any(t < 1 for t in tokens):
        raise MetanetError(f"token counts must be positive integers, got {tokens}")
    if new_tokens < 1:
        raise MetanetError(f"new tokens must be ≥ 1, got {new_tokens}")


def decode_steps_speed(model, prompt: torch.Tensor, new_tokens: int, device: torch.device, graph: bool = True) -> dict:
    """Tokens/s of a causal LM's greedy decode steps alone (prefill excluded) with a static KV cache, and whether
    they produce generate's greedy tokens (they do not for every family: OPT's positions need the attention
    mask). On CUDA with `graph` each step replays one CUDA graph of the model's forward (what serving stacks do: no host
    launch cost per kernel); elsewhere each step is an eager call.   prompt: [B, P]"""
    from transformers import StaticCache

    batch, length = prompt.shape
    with torch.inference_mode():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)[:, length:]
        cache = {_cache_keyword(model): StaticCache(config=model.config, max_cache_len=length + new_tokens)}
        logits = model(input_ids=prompt, **cache, cache_position=torch.arange(length, device=device), use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1], updated in place: the graph's input
        position = torch.tensor([length], device=device)

        def step() -> torch.Tensor:
            return model(input_ids=token, **cache, cache_position=position, use_cache=True).logits[:, -1]

        run = step
        graph = graph and device.type == "cuda"
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up before capture; it writes the cache slot the first replay rewrites
                step()
            torch.cuda.current_stream().wait_stream(side)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                graph_logits = step()
            run = lambda: (cuda_graph.replay(), graph_logits)[1]  # noqa: E731
        tokens = [token.clone()]
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token.copy_(run().argmax(-1, keepdim=True))
            position.add_(1)
            tokens.append(token.clone())
        _synchronize(device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": batch * (new_tokens - 1) / seconds, "graph": graph,
            "matches_generate": bool(torch.equal(torch.cat(tokens, dim=1), expected))}


def _cache_keyword(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x on (`past_key_values` before, deprecated then)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_speed(
    moe_dir: str | Path,
    tokens: list[int],
    new_tokens: int = 32,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    dense: str | None = None,
    corpus: str | None = None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
) -> dict:
    """FFN speed-ups per T and end-to-end tokens/s of the MoE checkpoint in `moe_dir` (module docstring), or of a
    folder `metanet export` / `apply --format transformers` wrote (transformers' GLM-4-MoE: each block's MoE module
    against the source's dense FFN, decode steps eager).

    dense: the dense checkpoint to compare with (default: the source its config names; when that is gone, an MoE
    checkpoint is timed alone end to end and an export is a MetanetError, since its dense FFNs come from the source;
    a `dense` that cannot be opened is a MetanetError before any timing). dtype None keeps the stored one.
    progress(description, total) returns a function to call after each step of that work.
    """
    from transformers import AutoTokenizer

    from metanet.calib import load_corpus, load_model_and_tokenizer, split_documents, tokenize_documents
    from metanet.calib.capture import ENCODER_FAMILIES, capture_ffn_inputs
    from metanet.checkpoints import open_checkpoint
    from metanet.moe.export_transformers import is_export

    check_counts(tokens, new_tokens)
    moe_dir = Path(moe_dir)
    target = resolve_device(device)
    subject = (_exported_subject if is_export(moe_dir) else _moe_subject)(moe_dir, target, dtype, dense)
    docs = load_corpus(corpus)
    try:
        tokenizer = AutoTokenizer.from_pretrained(moe_dir, local_files_only=True)
    except (OSError, ValueError):
        raise MetanetError(f"{moe_dir}: bench needs the tokenizer in the MoE folder (apply copies it from the source) to route real text") from None
    model, family = subject.model, subject.family
    _, heldout = split_documents(docs, seed=0)
    windows = tokenize_documents(tokenizer, heldout, max(2048, max(tokens) * 2), seq_len=128)  # [N, 128]
    inputs = capture_ffn_inputs(model, family, windows).layers  # block → [N·128, d] float32 on the CPU

    step = progress("FFN layers × token counts", len(tokens) * len(subject.blocks)) if progress else None
    rows = ffn_speed(subject.blocks, inputs, tokens, target, step)

    encoder = family in ENCODER_FAMILIES
    sample = windows[: ENCODER_BATCH[0], : ENCODER_BATCH[1]] if encoder else windows[:1, :PROMPT_TOKENS]
    step = progress("end to end", 2) if progress else None
    end_to_end = {"kind": "encoder forward" if encoder else "greedy generate", "input_shape": list(sample.shape),
                  "new_tokens": None if encoder else new_tokens, "moe": model_speed(model, sample, None if encoder else new_tokens, target)}
    if not encoder:
        end_to_end["moe_steps"] = decode_steps_speed(model, sample.to(target), new_tokens, target, graph=subject.graph_decode)
    if step:
        step()
    del model
    subject.model, subject.blocks = None, []  # free the MoE before the dense model loads
    dense_checkpoint = open_checkpoint(subject.dense) if subject.dense else None
    if dense_checkpoint is not None:
        dense_model, _ = load_model_and_tokenizer(dense_checkpoint)
        dense_model = dense_model.to(target, subject.dtype).requires_grad_(False)
        end_to_end["dense"] = model_speed(dense_model, sample, None if encoder else new_tokens, target)
        end_to_end["dense_source"] = subject.dense
        end_to_end["speedup"] = end_to_end["moe"]["tokens_per_s"] / end_to_end["dense"]["tokens_per_s"]
        if not encoder:
            end_to_end["dense_steps"] = decode_steps_speed(dense_model, sample.to(target), new_tokens, target)
            steps = end_to_end["moe_steps"], end_to_end["dense_steps"]
            if all(s["matches_generate"] for s in steps) and steps[0]["graph"] == steps[1]["graph"]:  # same tokens, same way: comparable
                end_to_end["steps_speedup"] = steps[0]["tokens_per_s"] / steps[1]["tokens_per_s"]
    else:
        end_to_end["dense_source"] = None
        log.warning("the dense source %s is not here: only the MoE model is timed end to end (pass --dense)", subject.source)
    if step:
        step()
    device_name = torch.cuda.get_device_name(target) if target.type == "cuda" else "CPU"
    return {"moe_dir": str(moe_dir), "format": subject.format, "device": device_name, "dtype": str(subject.dtype).removeprefix("torch."),
            "family": family, "experts": subject.experts, "active": subject.active, "layers": len(inputs), "ffn": rows, "end_to_end": end_to_end}


@dataclass
class _Subject:
    """What `measure_speed` times: the model, its blocks against their dense FFNs, and what it reports."""

    format: str  # metanet | transformers
    model: torch.nn.Module
    family: str
    blocks: list[TimedBlock]
    dtype: torch.dtype
    experts: int | None
    active: int | list[int] | None  # k, or k per block for an export
    source: str | None  # the dense source its config names
    dense: str | None  # the dense checkpoint to time end to end: `dense=`, or the source where it exists
    graph_decode: bool  # decode steps may be captured as CUDA graphs


def _moe_subject(moe_dir: Path, target: torch.device, dtype: torch.dtype | None, dense: str | None) -> _Subject:
    from metanet.checkpoints import open_checkpoint
    from metanet.moe import MoEFFN, load
    from metanet.moe.checkpoint import read_config

    _, section = read_config(moe_dir)  # MetanetError unless an MoE checkpoint
    source = section.get("source")
    if dense is not None:
        open_checkpoint(dense)
    model = load(moe_dir, device=target, dtype=dtype)
    blocks = [metanet_block(m) for m in model.modules() if isinstance(m, MoEFFN)]
    return _Subject("metanet", model, section["family"], blocks, dtype or getattr(torch, section["dtype"]), section["experts"], section["active"],
                    source, _reference(dense, source), True)


def _exported_subject(folder: Path, target: torch.device, dtype: torch.dtype | None, dense: str | None) -> _Subject:
    import json

    from transformers import AutoModelForCausalLM

    from metanet.checkpoints import open_checkpoint
    from metanet.moe.export_transformers import EXPORT_KEY

    config = json.loads((folder / "config.json").read_text())
    info = config[EXPORT_KEY]
    reference = exported_reference(folder, dense)
    checkpoint = open_checkpoint(reference)
    dtype = dtype or getattr(torch, config.get("dtype") or "float32")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).to(target).eval().requires_grad_(False)
    n_dense = config["first_k_dense_replace"]
    blocks = [TimedBlock(checkpoint.layer(i).to(target, dtype).forward, layer.mlp, dtype,
                         (lambda w: "dense") if i < n_dense else (lambda w: "transformers"), False)
              for i, layer in enumerate(model.model.layers)]
    return _Subject("transformers", model, "llama", blocks, dtype, info.get("experts"), info.get("active"), info.get("source"), reference, False)


def exported_reference(folder: Path, dense: str | None) -> str:
    """The dense checkpoint a transformers export is timed against: `dense`, else the source its config names; a
    MetanetError when neither is here (its dense FFNs come from there)."""
    import json

    from metanet.checkpoints import open_checkpoint
    from metanet.moe.export_transformers import ARCHITECTURE, EXPORT_KEY

    source = json.loads((folder / "config.json").read_text())[EXPORT_KEY].get("source")
    reference = _reference(dense, source)
    if reference is None:
        raise MetanetError(f"{folder} is a {ARCHITECTURE} export whose dense source {source!r} is not here; pass --dense CHECKPOINT")
    open_checkpoint(reference)
    return reference


def _reference(dense: str | None, source: str | None) -> str | None:
    """The dense checkpoint to compare with: `dense`, else the source an MoE config names while it is still here."""
    return dense or (source if source and Path(source).exists() else None)
