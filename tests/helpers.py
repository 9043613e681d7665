"""Shared test helpers."""

from __future__ import annotations

import os

import jax
import numpy as np

from minitx_fn.testing import (assert_close_scaled, assert_param_shapes, check_layer, enable_x64,  # noqa: F401
                                standard_promotion)


def user_env() -> dict:
    """The environment of a process started the way a user starts one: without the XLA
    flags tests/conftest.py adds to make compiling fast."""
    added = set(os.environ.get("MINITX_TEST_ADDED_XLA_FLAGS", "").split())
    return dict(os.environ, XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in added))


def count_calls(monkeypatch, module, name: str) -> list:
    """Replace module.name with a wrapper that records each call: for a function a
    jitted one calls in its body, the calls are its traces (compilations), counted by
    us rather than read from JAX's private cache."""
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


# One small model for every command-line test: the same configs everywhere, so the
# jitted step, evaluation and decode compile once per session (and the persistent
# compilation cache serves them to subprocesses).
TINY_MODEL = ["--width", "32", "--layers", "1", "--heads", "2", "--context", "16"]
TINY = [*TINY_MODEL, "--batch-size", "8"]


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """`minitx ARGV` in this process: (exit status, stdout, stderr)."""
    from minitx_fn.cli import main
    with standard_promotion():
        code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *fragments: str, status: int = 2) -> str:
    """Exit status, exactly one line `minitx: error: ...` on stderr, no traceback, and each fragment in it."""
    assert code == status, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minitx: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def legacy_meta(meta: dict, version: int) -> dict:
    """A format-9 meta.json as a run of an older `version` wrote it: the configs beside
    each other, the training config flat, no probe, and none of the model's fields that
    later versions added (a version that has them is refused)."""
    job = meta["job"]
    training = dict(job["training"])
    optimizer, lora = training.pop("optimizer"), training.pop("lora")
    old = {"format_version": version, "step": meta["step"], "tokenizer": meta["tokenizer"],
           "model_config": dict(job["model"]["config"]), "train_config": {**training, **optimizer},
           "data": job["data"], "origin": meta["origin"], "files": meta["files"]}
    if version >= 6:
        old["train_config"].update(lora_rank=0 if lora is None else lora["rank"], lora_alpha=None, lora_targets="attn")
    else:
        del old["train_config"]["grad_accum"]
    from minitx_fn import checkpoint
    for added, fields in checkpoint.ADDED_MODEL_FIELDS.items():
        for name in fields if added > version else ():
            old["model_config"].pop(name, None)
    return old


# The runs `saved_runs` (tests/conftest.py) trains: TINY, a record every 10 steps, saved at step 20.
RUN = [*TINY, "--log-every", "10", "--save-every", "20", "--max-new-tokens", "5"]


class Snapshot:
    """What a run's checkpoint holds, to prove later that a fault changed nothing."""

    def __init__(self, run_dir):
        self.run_dir = str(run_dir)
        self.step, self.params = self.read()

    def read(self):
        from minitx_fn import checkpoint
        with standard_promotion():
            ck = checkpoint.load(self.run_dir)
        return int(ck.meta["step"]), jax.tree.map(np.asarray, ck.state.params)

    def assert_unchanged(self):
        step, params = self.read()
        assert step == self.step
        jax.tree.map(np.testing.assert_array_equal, params, self.params)


def fail_fsync(monkeypatch, error: int, where=lambda path: True) -> None:
    """A disk that fails, at the operating system's seam: os.fsync raises OSError(error)
    for a file whose path `where` accepts (the descriptor's path from /proc/self/fd;
    where that cannot be read, every file). Every file the library writes whole (a
    checkpoint's, a cache's, a metrics record) is synced before it counts, so this is
    where a full (ENOSPC) or read-only (EROFS) disk shows."""
    real = os.fsync

    def fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if not path or where(path):
            raise OSError(error, os.strerror(error))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def sentencepiece_style(legacy: bool = False):
    """Llama-2's kind of tokenizer in Hugging Face's form: a space is "▁", one prepended
    to a text, and byte fallback: a character it has no piece for is its UTF-8 bytes as
    "<0xNN>" pieces. legacy: as Llama-2's own tokenizer.json does it, with no
    pre-tokenizer and a normalizer that prepends "▁" and writes each space as "▁";
    else by a Metaspace pre-tokenizer. Needs `tokenizers`."""
    import tokenizers as tk

    from minitx_fn.tokenizer import BPETokenizer
    pieces = "▁abcdefghijklmnopqrstuvwxyz"
    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {c: 256 + i for i, c in enumerate(pieces)}
    hf = tk.Tokenizer(tk.models.BPE(vocab, [], byte_fallback=True))
    if legacy:
        hf.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend("▁"), tk.normalizers.Replace(" ", "▁")])
    else:
        hf.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = tk.decoders.Sequence([tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse(),
                                       tk.decoders.Strip(" ", 1, 0)])
    return BPETokenizer(hf)
