"""An exact CLIP tokenizer built offline from the BPE vocabulary that open_clip's wheel ships."""
from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from ..utils.io import write_text

# CLIP's vocabulary: 256 byte symbols, the same with "</w>", 48894 merges, then two special tokens.
_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> list[str]:
    from open_clip.tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def write_clip_vocab(folder) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (the files transformers' CLIPTokenizer reads)."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe) as handle:
        lines = handle.read().decode("utf-8").split("\n")[1 : _MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    write_text(folder / "vocab.json", json.dumps({token: i for i, token in enumerate(vocab)}))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def clip_tokenizer():
    """transformers' CLIPTokenizer with CLIP's exact vocabulary, without any download."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        return CLIPTokenizer.from_pretrained(write_clip_vocab(folder), model_max_length=77)


def t5_tokenizer():
    """transformers' T5 tokenizer (a Unigram model) over a small vocabulary: ``<pad>``, ``</s>``, ``<unk>``,
    the word-start marker, lower-case letters, digits and the marker with each letter; no download.

    Not T5's real vocabulary (that needs its SentencePiece file): for tiny random text encoders only.
    """
    import string

    from transformers import T5Tokenizer

    marker = "\u2581"
    pieces = [marker, *string.ascii_lowercase, *string.digits, *(marker + c for c in string.ascii_lowercase)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(piece, -float(len(piece))) for piece in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0)
