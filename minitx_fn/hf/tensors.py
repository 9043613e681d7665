"""What every family's mapping shares: tree paths, and checking a folder's tensors."""

from __future__ import annotations

import numpy as np

from minitx_fn.errors import HFError


def few(names: list[str], n: int = 6) -> str:
    """The first n names, and how many more.

    Example:
        >>> few(["a", "b", "c"], 2)
        'a, b and 1 more'
    """
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def set_path(tree: dict, path: str, value) -> None:
    """tree[a][b][c] = value for path "a/b/c", making the dicts on the way.

    Example:
        >>> tree = {}
        >>> set_path(tree, "blocks/attn/qkv", 1); tree
        {'blocks': {'attn': {'qkv': 1}}}
    """
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def get_path(tree: dict, path: str):
    """tree[a][b][c] for path "a/b/c".

    Example:
        >>> get_path({"ln_f": {"scale": 2}}, "ln_f/scale")
        2
    """
    for name in path.split("/"):
        tree = tree[name]
    return tree


def checked_tensors(tensors: dict[str, np.ndarray], want: dict[str, tuple[int, ...]], dtype: str
                    ) -> dict[str, np.ndarray]:
    """The tensors cast to `dtype`, after checking they are exactly the names and shapes
    `want` lists and all finite; HFError names every missing, unexpected, misshapen
    or non-finite tensor at once.

    Example:
        >>> checked_tensors({"a": np.ones(2)}, {"a": (2,), "b": (1,)}, "float32")
        Traceback (most recent call last):
        minitx_fn.errors.HFError: the weights do not match config.json: missing b
    """
    missing, unexpected = sorted(want.keys() - tensors.keys()), sorted(tensors.keys() - want.keys())
    wrong = [f"{name} {tuple(tensors[name].shape)} (needs {want[name]})"
             for name in sorted(want.keys() & tensors.keys())
             if tuple(tensors[name].shape) != want[name]]
    if missing or unexpected or wrong:
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"wrong shapes: {few(wrong)}" if wrong else ""]
        raise HFError("the weights do not match config.json: " + "; ".join(p for p in parts if p))
    with np.errstate(over="ignore"):    # a float64 value beyond float32's range becomes inf: caught below
        tensors = {name: array.astype(np.dtype(dtype), copy=False) for name, array in tensors.items()}
    bad = [name for name in sorted(tensors) if not np.isfinite(tensors[name]).all()]
    if bad:
        raise HFError(f"tensors {few(bad)} hold NaN or infinite values in {dtype}; this model cannot be used")
    return tensors
