"""The decode kernels compiled ahead of time for Hopper (sm_90), on any machine: registers, spills,
shared memory, and the global-memory and matrix instructions of their machine code.

No GPU is needed: Triton compiles for a named target and the cuobjdump its package carries reads
the cubin. Every launch `metanet.kernels.decode.launches` makes is compiled with the arguments
specialised as Triton's JIT specialises them on a GPU (16-byte aligned pointers and integers that
are multiples of 16 marked so, an integer equal to 1 made a constant), from meta tensors of the
real shapes, so the machine code is what a launch there runs. What it answers before any GPU time
is spent: do the weight loads move 16 bytes per instruction (LDGSTS.E.BYPASS.128: asynchronous
copies into shared memory, software-pipelined), does any configuration spill registers (STACK > 0),
which matrix instructions run (HMMA.1688.F32.TF32: the float32 products on tensor cores).

Run: python -m benchmarks.decode_sass [--out benchmarks/results]     → decode-sass.md (~1 min, CPU)
     python -m benchmarks.decode_sass --check                          (JSON facts of two small layers: the test's)
Triton's interpreter must be off (TRITON_INTERPRET unset): it replaces the kernels with Python functions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from metanet.kernels.decode import DEFAULT_TILING, Launch, Tiling, call_tensors, launches
from metanet.moe.module import MoEFFN
from metanet.partition.partition import OperatingPoint

log = logging.getLogger("benchmarks.decode_sass")

RESULTS = Path(__file__).parent / "results"
HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = next((path for path in (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump", shutil.which("cuobjdump"))
                  if path and Path(path).is_file()), None)  # Triton's own copy, else a CUDA toolkit's
POINTER_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
#: Machine instructions counted: global loads and stores, asynchronous copies, matrix products.
INSTRUCTIONS = re.compile(r"\b(LDGSTS\.[.\w]*|LDG\.[.\w]*|STG\.[.\w]*|RED\.[.\w]*|ATOM\.[.\w]*|HMMA\.[.\w]*|HGMMA\.[.\w]*)")
#: (d, f, E) of the GPU benchmark's shapes, with k = E/4 and the expert width padded to 64.
SHAPES = ((4096, 14336, 16), (4096, 14336, 32), (4096, 11008, 16))
UP_BLOCKS = ((16, 128), (32, 128), (64, 64), (32, 256))
DOWN_BLOCKS = ((16, 256), (32, 128), (64, 128))
STAGES = (2, 4, 5)


def meta_moe(d: int, f: int, experts: int, dtype: torch.dtype = torch.bfloat16, activation: str = "silu",
             gated: bool = True, biased: bool = False) -> MoEFFN:
    """An MoEFFN of the real shapes whose tensors hold no memory (device "meta"); expert width f/E padded to 64."""
    width = -(-(f // experts) // 64) * 64
    empty = lambda *shape, dtype=dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    return MoEFFN(
        w_in=empty(experts, width, d), w_gate=empty(experts, width, d) if gated else None, w_out=empty(experts, d, width),
        b_in=empty(experts, width) if biased else None, b_out=empty(d) if biased else None,
        router_weight=empty(experts, d, dtype=torch.float32), router_bias=empty(experts, dtype=torch.float32),
        order=empty(experts * width, dtype=torch.int64), point=OperatingPoint(experts, experts // 4, 0), activation=activation,
    )


def decode_launches(moe: MoEFFN, n_tokens: int, tiling: Tiling = DEFAULT_TILING) -> list[tuple[Launch, dict]]:
    """The launches of one routed decode call of `moe` on n_tokens tokens, each with its arguments (meta tensors)."""
    tensors = call_tensors(moe, torch.empty(n_tokens, moe.d_model, dtype=moe.w_in.dtype, device="meta"), None)
    return [(launch, launch.arguments(tensors)) for launch in launches(moe, n_tokens, route=True, tiling=tiling)]


def compile_launch(launch: Launch, arguments: dict, target: GPUTarget = HOPPER):
    """launch's kernel compiled for `target`, its arguments specialised as the JIT would on a GPU."""
    kernel = launch.kernel
    signature, constexprs, attrs, options = {}, {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = arguments[name]
        if kernel.params[index].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, divisible = specialise(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {key: arguments[key] for key in ("num_warps", "num_stages") if key in arguments}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)


def specialise(value) -> tuple[str, bool]:
    """(signature type, divisible by 16) of one argument, by the rules Triton's JIT applies on a GPU: a tensor is a
    pointer to its dtype, aligned when its address is a multiple of 16 bytes (meta tensors: address 0); an integer
    equal to 1 becomes a constant; other integers are i32 (i64 when they need it), marked when a multiple of 16."""
    if isinstance(value, torch.Tensor):
        return f"*{POINTER_TYPES[value.dtype]}", value.data_ptr() % 16 == 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"no specialisation rule for {type(value).__name__} arguments")
    if value == 1:
        return "constexpr", False
    return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0


def machine_code_facts(compiled) -> dict:
    """Registers, stack (spills), shared memory (dynamic, bytes) and an instruction census of a compiled kernel's cubin."""
    if CUOBJDUMP is None:
        raise SystemExit("no cuobjdump: neither Triton's package nor a CUDA toolkit on PATH carries one")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    resources = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {"registers": int(resources["REG"]), "stack": int(resources["STACK"]), "shared": compiled.metadata.shared,
            "local": int(resources["LOCAL"]), "instructions": dict(Counter(INSTRUCTIONS.findall(sass)))}


def survey() -> list[dict]:
    """Facts of every decode kernel for the benchmark shapes: default and candidate tilings at T = 1 and 4, the default at T = 16."""
    rows = []
    default = Tiling()
    tilings = ([replace(default, up_block=up) for up in UP_BLOCKS] + [replace(default, down_block=down) for down in DOWN_BLOCKS[::2]]
               + [replace(default, num_warps=8)] + [replace(default, num_stages=stages) for stages in STAGES])
    for d, f, experts in SHAPES:
        moe = meta_moe(d, f, experts)
        for n_tokens in (1, 4, 16):
            seen = set()
            for tiling in tilings if n_tokens < 16 else [default]:
                for launch, arguments in decode_launches(moe, n_tokens, tiling):
                    name = launch.kernel.fn.__name__.strip("_").removesuffix("_kernel")
                    block = {"score": "", "up": "×".join(map(str, tiling.up_block)), "down": "×".join(map(str, tiling.down_block))}[name]
                    warps, stages = arguments["num_warps"], arguments.get("num_stages", "")
                    if (name, block, warps, stages) in seen:
                        continue
                    seen.add((name, block, warps, stages))
                    facts = machine_code_facts(compile_launch(launch, arguments))
                    rows.append({"d": d, "f": f, "experts": experts, "tokens": n_tokens, "kernel": name, "block": block, "num_warps": warps,
                                 "num_stages": stages, "grid": list(launch.grid), **facts})
                    log.info("%s", rows[-1])
    return rows


def check() -> list[dict]:
    """Facts of the launches of two layers (4096×14336 bf16 gated SiLU at T=1; 384×1536 float32 GELU with biases at T=16): the test's sample."""
    rows = []
    for moe, n_tokens in ((meta_moe(4096, 14336, 16), 1), (meta_moe(384, 1536, 16, torch.float32, "gelu", gated=False, biased=True), 16)):
        for launch, arguments in decode_launches(moe, n_tokens):
            rows.append({"kernel": launch.kernel.fn.__name__, "dtype": str(moe.w_in.dtype), **machine_code_facts(compile_launch(launch, arguments))})
    return rows


def report(rows: list[dict]) -> str:
    lines = [
        "# Decode kernels: Hopper machine code, compiled ahead of time",
        "",
        f"Compiled {datetime.date.today()} for sm_90 by `benchmarks/decode_sass.py` with Triton {triton.__version__} on a machine "
        "without a GPU (arguments specialised as Triton's JIT does on a GPU). Registers, stack bytes (> 0: spills), shared memory "
        "bytes, and the global loads, stores and matrix instructions of the machine code with how many times each appears "
        "(static counts, not executions). Block = BLOCK_M×BLOCK_D (up) or BLOCK_D×BLOCK_M (down); stages = depth of the software "
        "pipeline of weight loads (the score kernel has none). bf16 weights, gated SiLU, "
        "expert width f/E padded to 64; T tokens (T = 1 makes n_tokens a compile-time constant, as the JIT does; 16 is the most a decode call takes).",
        "",
        "| d × f, E | T | kernel | block | warps | stages | grid | registers | stack | shared | instructions |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        census = ", ".join(f"{name} ×{count}" for name, count in sorted(r["instructions"].items()))
        lines.append(f"| {r['d']}×{r['f']}, E={r['experts']} | {r['tokens']} | {r['kernel']} | {r['block']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['grid']} | {r['registers']} | {r['stack']} | {r['shared']} | {census} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="Print the facts of two small layers' launches as JSON (tests/test_kernels.py).")
    args = parser.parse_args()
    if args.check:
        print(json.dumps(check()))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = survey()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode-sass.md").write_text(report(rows))
    log.info("wrote %s", args.out / "decode-sass.md")


if __name__ == "__main__":
    main()
