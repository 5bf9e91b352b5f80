"""The miniature world's text tokenizer: a real transformers ``CLIPTokenizer`` built offline.

Its vocabulary holds the 256 byte-level symbols (bare and with ``</w>``, as CLIP's) plus one token
``word</w>`` for every word a base caption can contain, assembled by generated BPE merges. Words
the base world never uses — the held-out trigger words ``zorb``/``vlek``/``qarn`` among them — fall
back to character pieces, so a model pretrained on the world has never seen them as a word: exactly
the situation of a rare trigger token in a real Stable Diffusion.
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache

from .world import BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SHAPES, SIZES, STYLES, Scene

__all__ = ["MAX_LENGTH", "base_words", "world_tokenizer"]

#: The tokenizer's (and the text encoders') context length: the longest base caption is ~18 tokens.
MAX_LENGTH = 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache(maxsize=1)
def base_words() -> tuple[str, ...]:
    """Every word (``[a-z]+``) that some base :meth:`Scene.caption` contains, sorted.

    Each attribute value is varied over its whole vocabulary, so every phrase form (articles,
    plurals, count words, position phrases, background adjectives) is produced at least once."""
    words: set[str] = set()
    for shape, count, size, position in itertools.product(SHAPES, COUNTS, SIZES, POSITIONS):
        words.update(re.findall(r"[a-z]+", Scene(shape=shape, count=count, size=size, position=position).caption()))
    for background, bg_colour, style in itertools.product(BACKGROUNDS, COLOURS, STYLES):
        scene = Scene(background=background, background_colour=bg_colour, style=style)
        words.update(re.findall(r"[a-z]+", scene.caption()))
    for colour in COLOURS:
        words.update(re.findall(r"[a-z]+", Scene(colour=colour).caption()))
    return tuple(sorted(words))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word's pieces: repeatedly merge the lowest-ranked adjacent pair."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(pieces))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def world_tokenizer(max_length: int = MAX_LENGTH):
    """A ``CLIPTokenizer`` (bos 0, eos = pad 1) whose vocabulary has each base-caption word as one
    token. Merges are added word by word: the word is first split by the merges made so far (as BPE
    would) and the remaining pieces are joined left to right by new, lower-priority merges, so
    adding a word never changes how an earlier one is split."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in base_words():
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b, *pieces[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=int(max_length))
