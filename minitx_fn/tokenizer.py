"""Character tokenizer: each distinct character of the corpus is one token id.

Ids follow the sorted order of the characters, so the same corpus always gives
the same vocabulary.
"""

from __future__ import annotations

import dataclasses

import numpy as np


class UnknownCharactersError(ValueError):
    """Text holds characters that are not in the vocabulary."""


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Example:
        >>> tok = Tokenizer.from_text("hello")
        >>> tok.chars, tok.encode("hole").tolist(), tok.decode([3, 2])
        ('ehlo', [1, 3, 2, 0], 'ol')
    """

    chars: str  # the vocabulary: id i is chars[i]

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("the vocabulary is empty: build it from a non-empty text")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("the vocabulary repeats a character")

    @classmethod
    def from_text(cls, text: str) -> "Tokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """str of length T -> (T,) int32 ids. Raises UnknownCharactersError naming them."""
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise UnknownCharactersError(
                f"{len(unknown)} character(s) not in the vocabulary: {''.join(unknown)!r} "
                f"(the model knows {self.vocab_size}: {self.chars!r})")
        return np.fromiter((index[c] for c in text), np.int32, len(text))

    def decode(self, ids) -> str:
        """(T,) ids -> str."""
        return "".join(self.chars[int(i)] for i in ids)
