"""One byte-level BPE tokenizer (GPT-2 style) learned from text with the `tokenizers` package.

Every byte is in the initial alphabet, so any text tokenises without unknown tokens; the
single special token EOS separates documents and doubles as BOS, UNK and PAD. The result
is a transformers `PreTrainedTokenizerFast`, saved and loaded with save_pretrained /
from_pretrained like any checkpoint's tokenizer.
"""

from __future__ import annotations

EOS = "<|endoftext|>"

#: Characters of text the merges are learned on (the head of the joined documents): enough
#: for a vocabulary of a few thousand, and it keeps training to a second or two.
TOKENIZER_CHARS = 1_000_000


def train_bpe_tokenizer(docs: list[str], vocab_size: int, max_chars: int = TOKENIZER_CHARS):
    """Byte-level BPE with `vocab_size` tokens (EOS included) learned on the first `max_chars`
    characters of the documents joined by blank lines; paragraphs are the training sequences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "\n\n".join(docs)[:max_chars]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)
