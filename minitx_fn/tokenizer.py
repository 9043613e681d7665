"""Character tokenizer: each distinct character of the corpus is one token id.

Ids follow the sorted order of the characters, so the same corpus always gives
the same vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from minitx_fn.errors import Error


class UnknownCharactersError(Error):
    """Text holds characters that are not in the vocabulary."""


def code_points(text: str) -> np.ndarray:
    """str of length T -> (T,) uint32 Unicode code points, without a Python loop.

    Example:
        >>> code_points("hé").tolist()
        [104, 233]
    """
    # surrogatepass: a lone surrogate (how Python keeps a command-line byte that is not
    # UTF-8) becomes its own code point, which no vocabulary holds, so encode names it.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


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

    @functools.cached_property
    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """The vocabulary's code points in ascending order, and the id of each."""
        points = code_points(self.chars)
        order = np.argsort(points)
        return points[order], order.astype(np.int32)

    def encode(self, text: str) -> np.ndarray:
        """str of length T -> (T,) int32 ids. Raises UnknownCharactersError naming them.

        Vectorised: a binary search of each code point among the vocabulary's."""
        points = code_points(text)
        sorted_points, ids = self._sorted
        at = np.minimum(np.searchsorted(sorted_points, points), len(sorted_points) - 1)
        known = sorted_points[at] == points
        if not known.all():
            unknown = "".join(sorted(set(chr(p) for p in points[~known])))
            raise UnknownCharactersError(
                f"{len(unknown)} character(s) not in the vocabulary: {unknown!r} "
                f"(the model knows {self.vocab_size}: {self.chars!r})")
        return ids[at]

    def decode(self, ids) -> str:
        """(T,) ids -> str."""
        return "".join(self.chars[int(i)] for i in ids)
