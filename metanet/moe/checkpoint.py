"""The MoE checkpoint folder: written from a dense checkpoint and a Partition, verified, loaded.

On disk (format_version 1; DESIGN.md "Canonical objects"), with M the padded expert width:

    config.json                      the source's transformers config plus a "moe" section: format_version,
                                     family, n_layers, d_model, d_ff, activation, gated, experts,
                                     active, shared, expert_width (m = f/E), padded_width (M: m rounded
                                     up to a multiple of 64), method, router, dtype, router_dtype,
                                     source, fingerprints (FFNLayer.fingerprint() of each source layer),
                                     partition_info, output_bias (b_out stored for a family without FFN
                                     biases: a compensated partition's), layers (per block: experts,
                                     active, shared, expert_width, padded_width; a per-block plan
                                     differs from the nominal point above)
    model.safetensors                every source tensor but the FFN projections and biases, under its
                                     own name, unchanged (cast only when a dtype is asked for)
    moe-layer-{i:04d}.safetensors    block i's experts, grouped and contiguous:
                                         moe.layers.{i}.w_in           [E, M, d]
                                         moe.layers.{i}.w_gate         [E, M, d]  gated families only
                                         moe.layers.{i}.w_out          [E, d, M]
                                         moe.layers.{i}.b_in           [E, M]     families with FFN biases
                                         moe.layers.{i}.b_out          [d]        families with FFN biases, or output_bias
                                         moe.layers.{i}.router.weight  [E, d]     float32
                                         moe.layers.{i}.router.bias    [E]        float32
                                         moe.layers.{i}.order          int64 [E·M]  source neuron, −1 = pad
    checksums.json                   {"algorithm": "sha256", "files": {file: {tensor: digest}}}, each
                                     digest over the tensor's dtype, shape and bytes
    tokenizer / generation files     copied from the source folder (a GGUF source: saved by transformers)

Pad neurons have zero weights and zero b_in: they change no output (MoEFFN docstring).
Expert tensors are in one file per layer so that writing and loading hold one layer at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from metanet.calib.capture import ENCODER_FAMILIES, load_model_and_tokenizer
from metanet.checkpoints import Checkpoint
from metanet.checkpoints.families import Family, Layout, family_for
from metanet.checkpoints.sources import SafetensorsSource
from metanet.errors import MetanetError
from metanet.moe.convert import install
from metanet.moe.module import MoEFFN
from metanet.atomic import staged_folder
from metanet.partition.partition import OperatingPoint, Partition

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAD_MULTIPLE = 64  # expert width is rounded up to a multiple of this (GPU tiles)
ROUTER_DTYPE = torch.float32  # routers stay float32 whatever the experts' dtype: routing decisions match the partition's
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: Width of the placeholder FFNs transformers builds before the MoEFFNs replace them (see _build_model).
SKELETON_FFN_WIDTH = 8

DENSE_FILE = "model.safetensors"
CHECKSUM_FILE = "checksums.json"
#: Files of the source folder that travel with the model (those present are copied).
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "chat_template.jinja", "generation_config.json",
)
#: Expert tensor name in the file (after `moe.layers.{i}.`) → MoEFFN attribute.
EXPERT_TENSORS = {
    "w_in": "w_in", "w_gate": "w_gate", "w_out": "w_out", "b_in": "b_in", "b_out": "b_out",
    "router.weight": "router_weight", "router.bias": "router_bias", "order": "order",
}


def layer_file(i: int) -> str:
    return f"moe-layer-{i:04d}.safetensors"


# -- writing ----------------------------------------------------------------------------
def check_partition(checkpoint: Checkpoint, partition: Partition, progress: Callable[[], None] | None = None) -> None:
    """Raise MetanetError unless `partition` was made for `checkpoint`: same layer count, every layer's fingerprint.

    Reads every FFN layer once; `progress()` is called after each.
    """
    partition.check_layer_count(checkpoint.n_layers)
    for layer in checkpoint.layers():
        partition.check_matches(layer.index, layer.fingerprint())
        if progress:
            progress()


def apply(
    checkpoint: Checkpoint,
    partition: Partition,
    out: str | Path,
    dtype: torch.dtype | None = None,
    pad_multiple: int = PAD_MULTIPLE,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Write the MoE checkpoint of `partition` applied to `checkpoint` into the folder `out`; returns a summary.

    Before anything is written: the source must have the partition's layer count and load
    (a GGUF source is loaded by transformers, see `dense_parts`); `out` must not hold the
    source, and an existing `out` must be an MoE checkpoint (it is replaced) or empty. Each layer's fingerprint is
    compared with the partition's as the layer is read (use `check_partition` to refuse a
    foreign partition before starting). The folder is built beside `out` under a temporary
    name, then loaded back — every tensor re-read and checked against the checksum taken
    while writing, the transformers model built from the files (a source lacking a tensor
    its model needs is refused here) — and only then renamed to `out`. On any failure
    nothing is left behind (no `out`, no temporary folder) and the error is a one-line
    MetanetError.

    `dtype` casts every floating tensor but the routers (float32); None keeps the source's.
    `pad_multiple`: expert width rounded up to a multiple of it (1: no padding).
    `progress()` is called after each layer written.
    """
    start = time.perf_counter()
    out = Path(out)
    if pad_multiple < 1:
        raise MetanetError(f"pad multiple must be ≥ 1, got {pad_multiple}")
    check_destination(checkpoint, out)
    partition.check_layer_count(checkpoint.n_layers)
    parts = dense_parts(checkpoint)
    first_w_in = checkpoint.tensor_names(0)["w_in"]
    dtype = dtype or checkpoint.source.read([first_w_in])[first_w_in].dtype
    section = _moe_section(checkpoint, partition, dtype, pad_multiple)
    with staged_folder(out, "MoE checkpoint ") as tmp:
        checksums = _write(tmp, checkpoint, partition, section, parts, dtype, pad_multiple, progress)
        written = time.perf_counter()
        _read_model(tmp, dtype, source=checkpoint.path)  # every tensor re-read against its checksum, the model built from the files
        verified = time.perf_counter()
        size = sum(path.stat().st_size for path in tmp.iterdir())
    log.info("wrote and verified the MoE checkpoint %s (%d layers, %.1f MB)", out, checkpoint.n_layers, size / 1e6)
    keys = ("family", "n_layers", "experts", "active", "shared", "expert_width", "padded_width", "dtype")
    return {
        "out": str(out), **{key: section[key] for key in keys},
        "files": len(checksums), "tensors": sum(len(names) for names in checksums.values()), "size_mb": round(size / 1e6, 3),
        "write_s": round(written - start, 3), "verify_s": round(verified - written, 3),
    }


def _moe_section(checkpoint: Checkpoint, partition: Partition, dtype: torch.dtype, pad_multiple: int) -> dict:
    point, m = partition.point, partition.expert_width
    return {
        "format_version": FORMAT_VERSION,
        "family": checkpoint.family.name,
        "n_layers": checkpoint.n_layers,
        "d_model": checkpoint.d_model,
        "d_ff": checkpoint.d_ff,
        "activation": checkpoint.layout.activation,
        "gated": checkpoint.gated,
        "experts": point.experts,
        "active": point.active,
        "shared": point.shared,
        "expert_width": m,
        "padded_width": m + -m % pad_multiple,
        "method": partition.method,
        "router": partition.router,
        "dtype": _dtype_name(dtype),
        "router_dtype": _dtype_name(ROUTER_DTYPE),
        "source": str(checkpoint.path),
        "fingerprints": partition.fingerprints,
        "partition_info": partition.info,
        "output_bias": any(lp.b_out is not None for lp in partition.layers) and "b_out" not in checkpoint.layout.patterns,
        "layers": [_layer_entry(partition.layer_point(i), checkpoint.d_ff, pad_multiple) for i in range(checkpoint.n_layers)],
    }


def _layer_entry(point: OperatingPoint, d_ff: int, pad_multiple: int) -> dict:
    """A block's row of the moe section's `layers`: its operating point and expert widths."""
    m = point.expert_width(d_ff)
    return {"experts": point.experts, "active": point.active, "shared": point.shared, "expert_width": m, "padded_width": m + -m % pad_multiple}


@dataclass
class DenseParts:
    """What the MoE folder takes from its source besides the FFN layers."""

    config: dict  # the transformers config (config.json without a moe section)
    read_tensors: Callable[[], dict[str, torch.Tensor]]  # every tensor but the FFN projections and biases, by transformers name
    write_files: Callable[[Path], None]  # the tokenizer and generation files, into a folder


def dense_parts(checkpoint: Checkpoint) -> DenseParts:
    """The config, non-FFN tensors and tokenizer files of `checkpoint`, for a folder source and a GGUF source alike.

    A transformers checkpoint gives its config.json, its non-FFN tensors as stored, and its
    tokenizer and generation files (COPIED_FILES) copied. A GGUF file is loaded by transformers
    (`load_model_and_tokenizer`: dequantised to float32; MetanetError when it cannot), which
    gives what save_pretrained would write: the model's config (without quantization_config:
    the tensors are stored dequantised), every non-FFN tensor of its state_dict with tied
    aliases stored once (lm_head of tied embeddings is not stored; transformers ties it on
    load), and the tokenizer and generation config saved with save_pretrained. The GGUF's
    non-FFN tensors stay in memory until the parts are dropped; its FFN weights do not.
    """
    ffn_names = {name for i in range(checkpoint.n_layers) for role, name in checkpoint.tensor_names(i).items() if not role.startswith("norm.")}
    if checkpoint.source.format != "gguf":
        dense_names = [name for name in checkpoint.source.names() if name not in ffn_names]
        return DenseParts(dict(checkpoint.config), lambda: checkpoint.source.read(dense_names), _file_copier(checkpoint.folder))

    model, tokenizer = load_model_and_tokenizer(checkpoint)
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):  # stored dequantised; _name_or_path is where it was loaded from
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    tensors, stored = {}, set()  # name → tensor; (storage, offset, shape) of the tensors kept
    for name, tensor in model.state_dict().items():
        alias = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if name not in ffn_names and alias not in stored:
            tensors[name] = tensor
        stored.add(alias)
    generation_config = model.generation_config
    del model  # the dequantised FFN weights: the expert files are written from the GGUF's own layers

    def save_files(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        generation_config.save_pretrained(tmp)

    return DenseParts(config, lambda: tensors, save_files)


def _file_copier(folder: Path) -> Callable[[Path], None]:
    """Copies the COPIED_FILES `folder` has into another folder."""

    def copy_files(tmp: Path) -> None:
        for name in COPIED_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)

    return copy_files


def _write(tmp: Path, checkpoint: Checkpoint, partition: Partition, section: dict, parts: DenseParts,
           dtype: torch.dtype, pad_multiple: int, progress: Callable[[], None] | None) -> dict[str, dict[str, str]]:
    """Every file of the folder into `tmp`; returns the checksums written to checksums.json."""
    config = dict(parts.config)
    for key in ("torch_dtype", "dtype"):  # the config states the weights' dtype where it stated one
        if key in config:
            config[key] = section["dtype"]
    (tmp / "config.json").write_text(json.dumps({**config, "moe": section}, indent=2))
    parts.write_files(tmp)

    dense = {name: _cast(t, dtype) for name, t in parts.read_tensors().items()}
    checksums = {DENSE_FILE: _save(dense, tmp / DENSE_FILE)}
    del dense
    for layer in checkpoint.layers():  # one layer in memory at a time
        i = layer.index
        partition.check_matches(i, layer.fingerprint())
        moe = MoEFFN.from_layer(layer, partition.layers[i], partition.layer_point(i), pad_to=pad_multiple)
        checksums[layer_file(i)] = write_layer_file(tmp, moe, dtype)
        if progress:
            progress()
    (tmp / CHECKSUM_FILE).write_text(json.dumps({"algorithm": "sha256", "files": checksums}, indent=2))
    return checksums


def write_layer_file(folder: Path, module: MoEFFN, dtype: torch.dtype) -> dict[str, str]:
    """Write block `module.index`'s expert file into `folder` (routers float32, every other floating
    tensor cast to `dtype`); returns tensor name → digest for checksums.json."""
    tensors = {}
    for name, attr in EXPERT_TENSORS.items():
        tensor = getattr(module, attr)
        if tensor is not None:
            tensor = tensor.detach().cpu()
            tensors[f"moe.layers.{module.index}.{name}"] = tensor.to(ROUTER_DTYPE) if name.startswith("router.") else _cast(tensor, dtype)
    return _save(tensors, folder / layer_file(module.index))


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors to `dtype`, others (integer buffers, order) unchanged; contiguous for safetensors."""
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


def _save(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    """Write one safetensors file; returns tensor name → digest, taken from the tensors in memory."""
    digests = {name: _digest(tensor) for name, tensor in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return digests


def _digest(tensor: torch.Tensor) -> str:
    """sha256 over dtype, shape and the raw bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}:{list(tensor.shape)}:".encode())
    digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_destination(checkpoint: Checkpoint, out: str | Path) -> None:
    """What `apply` checks of `out` before it writes anything, for callers that do long work first (metanet convert):
    MetanetError when `out` holds the source or is an existing file or folder that is not an MoE checkpoint."""
    check_out_folder(Path(out), checkpoint.folder, is_moe_checkpoint, "not an MoE checkpoint")


def check_out_folder(out: Path, source_folder: Path, replaceable: Callable[[Path], bool], refusal: str) -> None:
    """MetanetError when `out` holds the source, is a file, or is a non-empty folder that `replaceable` does not accept
    (an earlier output the writer may replace); `refusal` completes "{out} exists and is …"."""
    if source_folder.resolve().is_relative_to(out.resolve()):
        raise MetanetError(f"--out {out} holds the source checkpoint; choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise MetanetError(f"{out} exists and is not a folder; choose another --out")
    if any(out.iterdir()) and not replaceable(out):
        raise MetanetError(f"{out} exists and is {refusal}; choose another --out or remove it")


def is_moe_checkpoint(folder: Path) -> bool:
    try:
        read_config(folder)
    except MetanetError:
        return False
    return True


# -- reading ----------------------------------------------------------------------------
def read_config(folder: str | Path) -> tuple[dict, dict]:
    """(config without its moe section, the moe section) of the MoE checkpoint in `folder`."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise MetanetError(f"no such folder: {folder}")
    if not config_file.is_file():
        raise MetanetError(f"{folder}: not an MoE checkpoint (no config.json); write one with `metanet apply`")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetanetError(f"{config_file}: broken JSON ({exc})") from None
    moe = config.pop("moe", None) if isinstance(config, dict) else None
    if not isinstance(moe, dict):
        raise MetanetError(f"{folder}: not an MoE checkpoint (config.json has no 'moe' section); write one with `metanet apply`")
    if moe.get("format_version") != FORMAT_VERSION:
        raise MetanetError(f"{folder}: MoE checkpoint format {moe.get('format_version')!r}; this metanet reads format {FORMAT_VERSION}")
    missing = [key for key in ("n_layers", "experts", "active", "shared", "dtype") if key not in moe]
    if missing or not isinstance(getattr(torch, str(moe.get("dtype")), None), torch.dtype):
        raise MetanetError(f"{config_file}: broken 'moe' section (missing {', '.join(missing) or 'nothing'}, dtype {moe.get('dtype')!r})")
    return config, moe


def load(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The transformers model of the MoE checkpoint in `folder`, every FFN an MoEFFN, ready for inference on `device`.

    Eval mode with every parameter's requires_grad off, so that on CUDA the MoEFFNs take
    the fast paths of `metanet.kernels` even outside torch.no_grad(); code that trains the
    model (metanet.heal) switches on the tensors it trains.

    Causal LMs come as their *ForCausalLM model with the checkpoint's generation config
    and run `model.generate`; encoders (bert) as the bare model (`last_hidden_state`).
    Every tensor is checked against checksums.json as it is read: a changed, missing or
    unexpected tensor is a MetanetError. `dtype` casts every floating weight but the
    routers (float32); None keeps the stored dtype.
    """
    folder = Path(folder)
    model = _read_model(folder, dtype, source=folder, device=device)
    if model.can_generate() and (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def _read_model(folder: Path, dtype: torch.dtype | None, source: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The MoE model of `folder`, every tensor checked; `source` is named when a needed tensor is missing.
    Each layer's experts go to `device` as soon as they are read (host memory then holds at most one layer's experts
    besides the rest of the model); the rest of the model stays on the CPU."""
    _, moe = read_config(folder)
    parts = dense_parts_of(folder)
    family = family_for(parts.config)
    dtype = dtype or getattr(torch, moe["dtype"])
    modules = [module.to(device) for module in read_layers(folder, dtype)]
    model = _build_model(parts.config, family, parts.read_tensors(), modules, dtype, source)
    log.info("loaded the MoE checkpoint %s: %d %s layers, E=%d, k=%d, %s", folder, len(modules), family.name, moe["experts"], moe["active"], _dtype_name(dtype))
    return model


def layer_points(moe: dict) -> list[OperatingPoint]:
    """Each block's operating point from an MoE checkpoint's moe section (format 1 without `layers`: the nominal one)."""
    point = OperatingPoint(moe["experts"], moe["active"], moe["shared"])
    rows = moe.get("layers") or [{}] * moe["n_layers"]
    return [OperatingPoint(row.get("experts", point.experts), row.get("active", point.active), row.get("shared", point.shared)) for row in rows]


def read_layers(folder: str | Path, dtype: torch.dtype | None = None) -> Iterator[MoEFFN]:
    """The MoEFFN of each block of the MoE checkpoint in `folder`, one at a time, every tensor checked against
    checksums.json; experts cast to `dtype` (None: as stored), routers float32."""
    folder = Path(folder)
    config, moe = read_config(folder)
    checksums = _read_checksums(folder, moe)
    family = family_for(config)
    layout = family.layout(config)
    if layout.n_layers != moe["n_layers"]:
        raise MetanetError(f"{folder}: config.json describes {layout.n_layers} layers, its moe section {moe['n_layers']}")
    dtype = dtype or getattr(torch, moe["dtype"])
    for i, point in enumerate(layer_points(moe)):
        yield _moe_module(_read_verified(folder / layer_file(i), checksums[layer_file(i)]), i, layout, family.name, point, dtype, bool(moe.get("output_bias")))


def dense_parts_of(folder: str | Path) -> DenseParts:
    """The config (without its moe section), the non-FFN tensors (checked against checksums.json) and the tokenizer and
    generation files of the MoE checkpoint in `folder`: what `dense_parts` gives of a source checkpoint."""
    folder = Path(folder)
    config, moe = read_config(folder)
    checksums = _read_checksums(folder, moe)
    return DenseParts(config, lambda: _read_verified(folder / DENSE_FILE, checksums[DENSE_FILE]), _file_copier(folder))


def _read_checksums(folder: Path, moe: dict) -> dict[str, dict[str, str]]:
    """File → {tensor → digest}; the files must be exactly model.safetensors and one per layer."""
    try:
        files = json.loads((folder / CHECKSUM_FILE).read_text())["files"]
    except FileNotFoundError:
        raise MetanetError(f"{folder}: no {CHECKSUM_FILE}: not a complete MoE checkpoint; write it again with `metanet apply`") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise MetanetError(f"{folder / CHECKSUM_FILE}: broken ({type(exc).__name__}: {exc})") from None
    expected = [DENSE_FILE, *(layer_file(i) for i in range(moe["n_layers"]))]
    if not isinstance(files, dict) or sorted(files) != sorted(expected):
        raise MetanetError(f"{folder / CHECKSUM_FILE}: lists other files than {DENSE_FILE} and {moe['n_layers']} layer files")
    return files


def _read_verified(path: Path, digests: dict[str, str]) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, each checked against its digest."""
    if not path.is_file():
        raise MetanetError(f"{path}: missing: the MoE checkpoint is incomplete; write it again with `metanet apply`")
    source = SafetensorsSource([path])  # CheckpointError for a truncated or corrupt file
    names = set(source.names())
    if names != set(digests):
        missing, extra = sorted(set(digests) - names), sorted(names - set(digests))
        raise MetanetError(f"{path}: tensors differ from {CHECKSUM_FILE} (missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'})")
    tensors = source.read(sorted(names))
    for name, tensor in tensors.items():
        if _digest(tensor) != digests[name]:
            raise MetanetError(f"{path}: checksum mismatch for tensor {name}: the file changed after it was written; write it again with `metanet apply`")
    return tensors


def _moe_module(tensors: dict[str, torch.Tensor], i: int, layout: Layout, family: str, point: OperatingPoint, dtype: torch.dtype,
                output_bias: bool = False) -> MoEFFN:
    """Block i's MoEFFN from its stored tensors: experts cast to `dtype`, router float32. `output_bias`: the checkpoint
    stores a compensated b_out even where the family's FFN has no biases."""
    prefix = f"moe.layers.{i}."
    expected = {"w_in", "w_out", "router.weight", "router.bias", "order"} | {role for role in ("w_gate", "b_in", "b_out") if role in layout.patterns}
    expected |= {"b_out"} if output_bias else set()
    stored = {name.removeprefix(prefix) for name in tensors}
    if stored != expected:
        raise MetanetError(f"layer {i}: stored expert tensors {sorted(stored)}, a {family} layer needs {sorted(expected)}")
    kwargs = {
        attr: tensors[prefix + name].to(ROUTER_DTYPE) if name.startswith("router.") else _cast(tensors[prefix + name], dtype)
        for name, attr in EXPERT_TENSORS.items() if name in stored
    }
    return MoEFFN(**kwargs, point=point, activation=layout.activation, index=i, family=family)


# -- the transformers model around the experts -----------------------------------------------
def _build_model(config: dict, family: Family, dense: dict[str, torch.Tensor], modules: list[MoEFFN], dtype: torch.dtype, source: Path) -> nn.Module:
    """transformers builds the model `config` describes from the non-FFN tensors `dense` (it knows each
    family's tensor names, renamings, tied embeddings and buffers); its FFNs are then swapped for `modules`.

    Causal LMs get their *ForCausalLM class, encoders their bare model (as `load_model_and_tokenizer`).
    transformers builds the FFNs it is told of and fills their weights, which no tensor provides, with
    random values; they only exist to be swapped out, so they are built SKELETON_FFN_WIDTH wide (the
    config gets its real width back afterwards) instead of costing a dense FFN's memory and
    initialisation time. Any other weight without a tensor is a MetanetError naming `source`.
    """
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING
    from transformers.utils import logging as transformers_logging

    hf_config = CONFIG_MAPPING[config["model_type"]].from_dict(config | {family.d_ff_key: SKELETON_FFN_WIDTH})
    model_class = (MODEL_MAPPING if family.name in ENCODER_FAMILIES else MODEL_FOR_CAUSAL_LM_MAPPING)[type(hf_config)]
    transformers_logging.disable_progress_bar()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report lists the dense FFN weights as missing: they are, on purpose
    try:
        model, info = model_class.from_pretrained(
            None, config=hf_config, state_dict=dense, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True,
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    if info["unexpected_keys"]:
        log.debug("%d stored tensors not used by %s: %s", len(info["unexpected_keys"]), model_class.__name__, ", ".join(sorted(info["unexpected_keys"])[:5]))
    if info["mismatched_keys"]:
        key, stored, expected = sorted(info["mismatched_keys"])[0]
        raise MetanetError(f"{source}: shape mismatch: {key} is {list(stored)}, {model_class.__name__} expects {list(expected)}")
    dense_keys = set(model.state_dict())
    install(model, family.name, modules)
    setattr(model.config, family.d_ff_key, config.get(family.d_ff_key))
    ffn_keys = dense_keys - set(model.state_dict())  # the weights the MoEFFNs replaced
    missing = sorted(set(info["missing_keys"]) - ffn_keys)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MetanetError(f"{source}: missing tensor {missing[0]}{more} (needed by {model_class.__name__})")
    return model
