"""The zoo's shared text: one tokenizer and the token ids every member trains and is measured on.

The corpus is split by whole document exactly as `metanet.calib.text_split` splits it (seed 0),
so members learn only from the calibration split and every held-out number, here or from
`metanet eval` on a member, is on plays no member has seen. Files in the zoo folder:

    tokenizer/          byte-level BPE learned on the calibration split (save_pretrained)
    data.safetensors    train        int64 [N]      the calibration documents as one stream, EOS between documents
                        train_sample int64 [n, S]   seeded windows of that stream, as many as `heldout` (train_loss)
                        calibration  int64 [Nc, S]  } tokenize_documents(…, seed=0) of each split: with S = 128
                        heldout      int64 [Nh, S]  } the very windows `metanet partition` / `metanet eval` draw
    zoo.json            the data settings and the unigram baseline; written last, so its presence
                        means the files above are complete
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from metanet.atomic import atomic_path
from metanet.errors import MetanetError
from training.lm import random_windows, unigram_entropy
from training.zoo_config import ZooConfig

log = logging.getLogger(__name__)

DATA_FILE = "data.safetensors"
INFO_FILE = "zoo.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class ZooData:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    train: torch.LongTensor  # [N]
    train_sample: torch.LongTensor  # [n, S]
    calibration: torch.LongTensor  # [Nc, S]
    heldout: torch.LongTensor  # [Nh, S]
    unigram_loss: float  # entropy of the held-out tokens: the best any unigram model can do


def prepare_zoo_data(config: ZooConfig, root: Path) -> ZooData:
    """The zoo's data, made once: loaded when `root` has it (the settings must match), else built and written."""
    info_file = root / INFO_FILE
    if info_file.is_file():
        recorded = json.loads(info_file.read_text())["data"]
        if recorded != config.data_settings():
            changed = ", ".join(f"{k}: {recorded.get(k)!r} → {v!r}" for k, v in config.data_settings().items() if recorded.get(k) != v)
            raise MetanetError(f"{root} holds a zoo built with other data settings ({changed}); build into another --out")
        return load_zoo_data(root)
    from metanet.calib import load_corpus, split_documents, tokenize_documents
    from training.tokenizer import train_bpe_tokenizer

    calib_docs, heldout_docs = split_documents(load_corpus(config.corpus), seed=0)
    tokenizer = train_bpe_tokenizer(calib_docs, config.vocab_size)
    stream = []
    for ids in tokenizer(calib_docs, add_special_tokens=False, verbose=False)["input_ids"]:
        stream += [tokenizer.eos_token_id, *ids] if stream else ids
    train = torch.tensor(stream, dtype=torch.long)
    if train.numel() < 2 * config.seq_len:
        raise MetanetError(f"the corpus' calibration split has only {train.numel()} tokens; a zoo needs far more text than seq_len={config.seq_len}")
    heldout = tokenize_documents(tokenizer, heldout_docs, config.heldout_tokens, config.seq_len, seed=0)
    data = ZooData(
        tokenizer=tokenizer,
        train=train,
        train_sample=random_windows(train, heldout.shape[0], config.seq_len, torch.Generator().manual_seed(0)),
        calibration=tokenize_documents(tokenizer, calib_docs, config.calib_tokens, config.seq_len, seed=0),
        heldout=heldout,
        unigram_loss=unigram_entropy(heldout),
    )
    _write(data, config, root)
    log.info("zoo data: %d-token vocabulary, %d training tokens, unigram baseline %.3f nats", len(tokenizer), train.numel(), data.unigram_loss)
    return data


def load_zoo_data(root: Path) -> ZooData:
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    tensors = load_file(root / DATA_FILE)
    info = json.loads((root / INFO_FILE).read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / TOKENIZER_DIR, local_files_only=True)
    return ZooData(tokenizer, tensors["train"], tensors["train_sample"], tensors["calibration"], tensors["heldout"], info["unigram_loss"])


def _write(data: ZooData, config: ZooConfig, root: Path) -> None:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = root / TOKENIZER_DIR
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    data.tokenizer.save_pretrained(tokenizer_dir)
    tensors = {"train": data.train, "train_sample": data.train_sample, "calibration": data.calibration, "heldout": data.heldout}
    with atomic_path(root / DATA_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    info = {"data": config.data_settings(), "vocab_size": len(data.tokenizer), "train_tokens": data.train.numel(), "unigram_loss": data.unigram_loss}
    with atomic_path(root / INFO_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
