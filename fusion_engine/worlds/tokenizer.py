"""An exact CLIP tokenizer built offline from the BPE vocabulary that open_clip's wheel ships."""
from __future__ import annotations

import gzip
import json
import re
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


def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE of one word: merge the lowest-ranked adjacent pair (every occurrence) until none is ranked."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def write_world_vocab(folder, words) -> Path:
    """``vocab.json`` and ``merges.txt`` for a CLIP BPE tokenizer whose vocabulary is CLIP's 512 byte symbols
    (with and without ``</w>``), the merges that make each word of ``words`` one token (and their intermediate
    pieces), then the two special tokens: a world-sized table (a few hundred rows instead of 49,408). Each word is
    merged letter by letter, left to right; where another word's merge cuts in first, a merge of the two pieces
    it leaves is appended (lowest priority, so no word already whole changes). Any other text falls back to
    byte symbols, as CLIP's own tokenizer does for rare words."""
    from ..errors import OptionError

    words = list(dict.fromkeys(words))
    bad = [word for word in words if not isinstance(word, str) or not re.fullmatch(r"[a-z0-9]+", word)]
    if bad or not words:
        raise OptionError(f"world vocabulary: words must be lower-case letters and digits, one word each; got {bad!r}"
                          if bad else "world vocabulary: no words given")
    merges: dict[tuple[str, str], int] = {}  # pair: rank (insertion order)
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.setdefault((merged, piece), len(merges))
            merged += piece
    for _ in range(sum(len(word) for word in words)):  # bounded: each pass adds at most one merge per word
        split = [pieces for pieces in (_bpe(word, merges) for word in words) if len(pieces) > 1]
        if not split:
            break
        for pieces in split:
            merges.setdefault((pieces[0], pieces[1]), len(merges))
    symbols = _bytes_to_unicode()
    vocab = [*symbols, *(s + "</w>" for s in symbols)]
    known = set(vocab)
    vocab += [token for token in dict.fromkeys(a + b for a, b in merges) if token not in known]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    write_text(folder / "vocab.json", json.dumps({token: i for i, token in enumerate(vocab)}))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def world_tokenizer(words):
    """transformers' CLIPTokenizer over a world-sized vocabulary (``write_world_vocab``); every word of ``words``
    must come out as one token (checked: an ``OptionError`` names the first that does not)."""
    from transformers import CLIPTokenizer

    from ..errors import OptionError

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(write_world_vocab(folder, words), model_max_length=77)
    for word in words:
        if len(tokenizer.tokenize(word)) != 1:
            raise OptionError(f"world vocabulary: {word!r} is not one token ({tokenizer.tokenize(word)})")
    return tokenizer
