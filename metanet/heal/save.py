"""Write a healed MoE model as an MoE checkpoint folder, in the format `metanet apply` writes.

Healing trains MoEFFN tensors only, so the folder is the source MoE checkpoint with new
expert files: config.json gains `moe.healing` (teacher, settings, metrics), model.safetensors
(every non-FFN tensor) and the tokenizer files are copied byte for byte, each
moe-layer-{i}.safetensors is written from the healed module (`write_layer_file`), and
checksums.json lists the digests. The folder is built beside `out` under a temporary name,
loaded back with `metanet.moe.load` (every tensor checked against its checksum), and only
then renamed to `out`; on any failure nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from pathlib import Path

import torch

from metanet.atomic import replace_folder
from metanet.errors import MetanetError
from metanet.moe.checkpoint import CHECKSUM_FILE, COPIED_FILES, DENSE_FILE, layer_file, load, read_config, write_layer_file
from metanet.moe.module import MoEFFN

log = logging.getLogger(__name__)


def save_healed(model: torch.nn.Module, source: Path, out: Path, healing: dict) -> None:
    """Write `model` — loaded from the MoE checkpoint `source`, MoEFFN tensors healed — to the folder `out`.

    `healing` is stored as config.json's moe.healing. Experts keep the source's dtype, routers float32.
    """
    config, moe = read_config(source)
    checksums = json.loads((source / CHECKSUM_FILE).read_text())["files"]
    modules = sorted((m for m in model.modules() if isinstance(m, MoEFFN)), key=lambda m: m.index)
    if len(modules) != moe["n_layers"]:
        raise MetanetError(f"the healed model has {len(modules)} MoE layers, {source} has {moe['n_layers']}")
    dtype = getattr(torch, moe["dtype"])
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"  # beside `out`: the final rename stays on one filesystem
    try:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps({**config, "moe": {**moe, "healing": healing}}, indent=2))
        for name in (*COPIED_FILES, DENSE_FILE):
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        files = {DENSE_FILE: checksums[DENSE_FILE]}
        for module in modules:
            files[layer_file(module.index)] = write_layer_file(tmp, module, dtype)
        (tmp / CHECKSUM_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))
        load(tmp)  # every tensor re-read against its checksum, the model built from the files
        replace_folder(tmp, out)
    except OSError as exc:
        raise MetanetError(f"cannot write MoE checkpoint {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote and verified the healed MoE checkpoint %s", out)
