"""Speed of an MoE checkpoint against the dense model it came from, on one device (`metanet bench`).

FFN layers: for every T in `tokens`, each block's MoEFFN (the path `metanet.kernels` chooses) and
the dense FFN it was carved from (`MoEFFN.to_ffn_layer`: same weights, device and dtype) run on
T real FFN inputs — captured by the MoE model itself on held-out text, so the routing is the
checkpoint's own on real text. The model's FFN time at T is the sum over blocks, and

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


def ffn_speed(moe_modules: list, inputs: dict[int, torch.Tensor], tokens: list[int], device: torch.device,
              progress: Callable[[], None] | None = None) -> list[dict]:
    """One row per T: summed dense and MoE FFN milliseconds over the blocks, the speed-up and the paths taken.

    moe_modules: each block's MoEFFN on `device`; inputs: block → its FFN inputs [N, d] (N ≥ max(tokens)).
    Call i of a pass runs tokens [i·T, (i+1)·T) of the block's inputs (wrapping), so calls route differently.
    On CUDA, for T ≤ DECODE_MAX_TOKENS (where no path synchronises with the host), the rows also hold the
    pass replayed as one CUDA graph (`dense_graph_ms`, `moe_graph_ms`, `graph_speedup`): GPU time alone,
    as serving stacks run decode steps. `progress()` is called after each (block, T).
    """
    from metanet.kernels import choose_path
    from metanet.kernels.dispatch import DECODE_MAX_TOKENS

    graphs = [t for t in tokens if device.type == "cuda" and t <= DECODE_MAX_TOKENS and all(m.kernel == "auto" for m in moe_modules)]
    times = {key: dict.fromkeys(tokens, 0.0) for key in ("dense_ms", "moe_ms", "dense_graph_ms", "moe_graph_ms")}  # T → summed over blocks
    paths = {n_tokens: Counter() for n_tokens in tokens}
    for i, moe in enumerate(moe_modules):
        dense = moe.to_ffn_layer()  # the block's dense FFN, built once for all T: same weights, device and dtype
        pool = inputs[i]
        for n_tokens in tokens:
            windows = [pool[(j * n_tokens + torch.arange(n_tokens)) % pool.shape[0]].to(device, moe.w_in.dtype) for j in range(CALLS)]  # each [T, d]
            calls = {"dense": lambda j: dense.forward(windows[j]), "moe": lambda j: moe(windows[j])}
            with torch.inference_mode():
                for name, call in calls.items():
                    times[f"{name}_ms"][n_tokens] += per_call_ms(call, CALLS, REPEATS, device)
                    if n_tokens in graphs:
                        times[f"{name}_graph_ms"][n_tokens] += per_call_ms(call, CALLS, REPEATS, device, graph=True)
                paths[n_tokens].update(choose_path(moe, w, lambda w=w: moe.route(w)) if moe.kernel == "auto" else moe.kernel for w in windows)
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


def decode_steps_speed(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> dict:
    """Tokens/s of a causal LM's greedy decode steps alone (prefill excluded) with a static KV cache, and whether
    they produce generate's greedy tokens (they do not for every family: OPT's positions need the attention
    mask). On CUDA each step replays one CUDA graph of the model's forward (what serving stacks do: no host
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
        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up before capture; it writes the cache slot the first replay rewrites
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_logits = step()
            run = lambda: (graph.replay(), graph_logits)[1]  # noqa: E731
        tokens = [token.clone()]
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token.copy_(run().argmax(-1, keepdim=True))
            position.add_(1)
            tokens.append(token.clone())
        _synchronize(device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": batch * (new_tokens - 1) / seconds, "graph": device.type == "cuda",
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
    """FFN speed-ups per T and end-to-end tokens/s of the MoE checkpoint in `moe_dir` (module docstring).

    dense: the dense checkpoint to compare end to end (default: the source its config names; when
    that folder is gone, only the MoE is timed end to end; a `dense` that cannot be opened is a
    MetanetError before any timing). dtype None keeps the stored one.
    progress(description, total) returns a function to call after each step of that work.
    """
    from transformers import AutoTokenizer

    from metanet.calib import load_corpus, load_model_and_tokenizer, split_documents, tokenize_documents
    from metanet.calib.capture import ENCODER_FAMILIES, capture_ffn_inputs
    from metanet.checkpoints import open_checkpoint
    from metanet.moe import MoEFFN, load
    from metanet.moe.checkpoint import read_config

    check_counts(tokens, new_tokens)
    moe_dir = Path(moe_dir)
    _, section = read_config(moe_dir)  # MetanetError unless an MoE checkpoint
    target = resolve_device(device)
    source = section.get("source")
    dense_checkpoint = open_checkpoint(dense) if dense else open_checkpoint(source) if source and Path(source).exists() else None
    docs = load_corpus(corpus)
    try:
        tokenizer = AutoTokenizer.from_pretrained(moe_dir, local_files_only=True)
    except (OSError, ValueError):
        raise MetanetError(f"{moe_dir}: bench needs the tokenizer in the MoE folder (apply copies it from the source) to route real text") from None
    model = load(moe_dir, device=target, dtype=dtype)
    family = section["family"]
    modules = [m for m in model.modules() if isinstance(m, MoEFFN)]
    _, heldout = split_documents(docs, seed=0)
    windows = tokenize_documents(tokenizer, heldout, max(2048, max(tokens) * 2), seq_len=128)  # [N, 128]
    inputs = capture_ffn_inputs(model, family, windows).layers  # block → [N·128, d] float32 on the CPU

    step = progress("FFN layers × token counts", len(tokens) * len(modules)) if progress else None
    rows = ffn_speed(modules, inputs, tokens, target, step)

    encoder = family in ENCODER_FAMILIES
    sample = windows[: ENCODER_BATCH[0], : ENCODER_BATCH[1]] if encoder else windows[:1, :PROMPT_TOKENS]
    step = progress("end to end", 2) if progress else None
    end_to_end = {"kind": "encoder forward" if encoder else "greedy generate", "input_shape": list(sample.shape),
                  "new_tokens": None if encoder else new_tokens, "moe": model_speed(model, sample, None if encoder else new_tokens, target)}
    if not encoder:
        end_to_end["moe_steps"] = decode_steps_speed(model, sample.to(target), new_tokens, target)
    if step:
        step()
    del model, modules
    if dense_checkpoint is not None:
        dense_model, _ = load_model_and_tokenizer(dense_checkpoint)
        dense_model = dense_model.to(target, dtype or getattr(torch, section["dtype"])).requires_grad_(False)
        end_to_end["dense"] = model_speed(dense_model, sample, None if encoder else new_tokens, target)
        end_to_end["dense_source"] = str(dense or source)
        end_to_end["speedup"] = end_to_end["moe"]["tokens_per_s"] / end_to_end["dense"]["tokens_per_s"]
        if not encoder:
            end_to_end["dense_steps"] = decode_steps_speed(dense_model, sample.to(target), new_tokens, target)
            steps = end_to_end["moe_steps"], end_to_end["dense_steps"]
            if all(s["matches_generate"] for s in steps):  # the steps decode what generate decodes: comparable
                end_to_end["steps_speedup"] = steps[0]["tokens_per_s"] / steps[1]["tokens_per_s"]
    else:
        end_to_end["dense_source"] = None
        log.warning("the dense source %s is not here: only the MoE model is timed end to end (pass --dense)", source)
    if step:
        step()
    device_name = torch.cuda.get_device_name(target) if target.type == "cuda" else "CPU"
    return {"moe_dir": str(moe_dir), "device": device_name, "dtype": section["dtype"] if dtype is None else str(dtype).removeprefix("torch."),
            "family": family, "experts": section["experts"], "active": section["active"], "layers": len(inputs),
            "ffn": rows, "end_to_end": end_to_end}
