"""Larger corpora: streamed preparation and its cache, the three tokenizers, memory-mapped
batches (equal to device-resident ones), the fixed validation sample, resume on the
memory-mapped path. Expected values come from the in-memory path (`read_text` and a
tokenizer's `encode` of the whole text), from `train.batch_at` on the device, or from
round-trip properties."""

from __future__ import annotations

import io
import hashlib
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import corpus, data, runs, train
from minitx_fn.errors import DataError
from minitx_fn.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer
from tests.helpers import TINY, assert_one_error_line, run_main

try:
    import tokenizers  # noqa: F401
    HAVE_TOKENIZERS = True
except ImportError:
    HAVE_TOKENIZERS = False
needs_tokenizers = pytest.mark.skipif(not HAVE_TOKENIZERS, reason="the bpe tokenizer needs the optional "
                                      "'tokenizers' library (pip install -e '.[bpe]')")

TEXT = "First Citizen: héllo, wörld! 😀 Before we proceed any further, hear me speak.\n" * 40


def _write(tmp_path, text: str | bytes, name="t.txt") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def _prepare(path, cache, **kw):
    out = io.StringIO()
    c = corpus.prepare(path, cache_dir=str(cache), out=out, **kw)
    return c, out.getvalue()


# ----------------------------------------------------------------------------- tokenizers


@given(st.text(max_size=50))
def test_the_byte_tokenizer_round_trips_any_unicode_string(text):
    ids = ByteTokenizer().encode(text)
    assert ids.dtype == np.int32 and ((0 <= ids) & (ids < 256)).all()
    assert ByteTokenizer().decode(ids) == text


@given(st.lists(st.integers(0, 255), max_size=30))
def test_any_byte_ids_decode_without_error(ids):
    """A sample may stop inside a multi-byte character: decoding replaces it, never raises."""
    text = ByteTokenizer().decode(ids)
    assert isinstance(text, str)
    if bytes(ids).isascii():
        assert text == bytes(ids).decode("ascii")


@given(st.text(min_size=1, max_size=40))
def test_char_encode_by_table_equals_the_position_in_the_sorted_vocabulary(text):
    tok = CharTokenizer.from_text(text)
    assert tok.encode(text).tolist() == [sorted(set(text)).index(c) for c in text]
    assert tok.decode(tok.encode(text)) == text


@needs_tokenizers
def test_bpe_is_reproducible_and_round_trips_any_text():
    from minitx_fn.tokenizer import BPETokenizer, from_meta
    first = BPETokenizer.train([TEXT], vocab_size=300)
    second = BPETokenizer.train([TEXT], vocab_size=300)
    assert first.to_json() == second.to_json() and first.vocab_size == 300
    assert from_meta(first.to_meta()) == first and "special" not in first.to_meta()
    marked = first.with_special({"bos_token_id": 0, "eos_token_id": [1, 299], "pad_token_id": None})
    assert from_meta(marked.to_meta()) == marked != first and marked.special == {"bos_token_id": 0,
                                                                                  "eos_token_id": [1, 299]}
    for bad, said in (({"eos_token_id": 300}, r"eos_token_id = 300 must be an id in \[0, 300\)"),
                      ({"eos_token_id": []}, "eos_token_id = \\[\\] must be"), ({"unk_token_id": 1}, "not a special"),
                      ({"bos_token_id": True}, "bos_token_id = True must be")):
        with pytest.raises(ValueError, match=said):
            from_meta({**first.to_meta(), "special": bad})
    with pytest.raises(ValueError, match="id 300 is not one of the bpe tokenizer's 300 ids; a model whose table"):
        first.decode([5, 300])                               # tokenizers itself would drop it
    for text in (TEXT, "ünseen çharacters ∑ 😀\n", "héllo"):
        assert first.decode(first.encode(text)) == text
    assert len(first.encode(TEXT)) < len(TEXT.encode()) / 2          # merges learned: fewer tokens than bytes


@needs_tokenizers
@given(st.text(max_size=30))
def test_bpe_round_trips_any_unicode_string(text):
    tok = _bpe()
    assert tok.decode(tok.encode(text)) == text


_BPE = []


def _bpe():
    from minitx_fn.tokenizer import BPETokenizer
    if not _BPE:
        _BPE.append(BPETokenizer.train([TEXT], vocab_size=280))
    return _BPE[0]


# ----------------------------------------------------------------------------- preparation


@pytest.mark.parametrize("kind", ["char", "byte"])
@given(text=st.text(min_size=1, max_size=60), chunk=st.sampled_from([1, 2, 3, 5, 64]))
def test_streamed_preparation_equals_encoding_the_whole_text(tmp_path_factory, kind, text, chunk):
    """Any text, cut into chunks of any size (multi-byte characters straddling them):
    the ids and split are those of encoding the whole text at once."""
    tmp = tmp_path_factory.mktemp("p")
    path = _write(tmp, text)
    old = corpus.CHUNK_BYTES
    corpus.CHUNK_BYTES = chunk
    try:
        c, _ = _prepare(path, tmp / "cache", kind=kind)
    finally:
        corpus.CHUNK_BYTES = old
    tok = CharTokenizer.from_text(text) if kind == "char" else ByteTokenizer()
    whole = tok.encode(_read(path))
    assert c.tokenizer == tok and c.ids.tolist() == whole.tolist()
    assert c.boundary == (len(whole) * 9) // 10
    assert c.ids.dtype == np.uint8 and c.source["sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_the_cache_is_reused_when_valid_and_rebuilt_when_anything_is_off(tmp_path):
    path = _write(tmp_path, TEXT)
    cache = tmp_path / "cache"
    first, out = _prepare(path, cache)
    assert "Data: prepared" in out
    folder = first.folder
    tokens = os.path.join(folder, "tokens.bin")
    manifest = os.path.join(folder, "manifest.json")
    again, out = _prepare(path, cache)
    assert "prepared before" in out and again.ids.tolist() == first.ids.tolist()
    assert isinstance(again.ids, np.memmap)

    def rebuilt(edit, said):
        edit()
        c, out = _prepare(path, cache)
        assert said in out and "preparing again" in out, out
        expected = CharTokenizer.from_text(_read(path)).encode(_read(path))
        assert c.ids.tolist() == expected.tolist()
        assert "prepared before" in _prepare(path, cache)[1]

    def truncate():
        with open(tokens, "r+b") as f:
            f.truncate(10)

    def flip():
        raw = bytearray(open(tokens, "rb").read())
        raw[5] ^= 1
        before = os.stat(tokens).st_mtime_ns
        open(tokens, "wb").write(bytes(raw))
        # A file system's clock may tick coarser than this test runs: say the edit came a second later.
        os.utime(tokens, ns=(before + 10**9, before + 10**9))

    def foreign_tokenizer():
        meta = json.load(open(manifest))
        meta["tokenizer"] = {"kind": "char", "chars": "xyz"}
        json.dump(meta, open(manifest, "w"))

    rebuilt(truncate, "truncated")
    rebuilt(flip, "changed since it was written")
    rebuilt(lambda: open(manifest, "w").write("{not json"), "damaged or foreign manifest")
    rebuilt(foreign_tokenizer, "tokenizer that changed since it was written")

    def edit_manifest(**changes):
        def edit():
            meta = json.load(open(manifest))
            for key, value in changes.items():
                meta[key] = value
            json.dump(meta, open(manifest, "w"))
        return edit

    rebuilt(edit_manifest(source=None), "damaged or foreign manifest")
    rebuilt(edit_manifest(tokens={"file": None}), "damaged or foreign manifest")
    rebuilt(edit_manifest(boundary=5), "boundary is not at 90%")
    rebuilt(lambda: os.remove(manifest), "holds no manifest")
    rebuilt(lambda: open(path, "a").write("more text"), "another version of")
    # A run's own tokenizer that differs from the one learned from the text (a fine-tuned
    # run's): encoded with it into a folder of its own, beside the learned one, which a
    # plain preparation still finds whole (it was overwritten before, and a later
    # `--data FILE` trained with the other vocabulary).
    own = CharTokenizer.from_text(TEXT + "more text" + "#")
    c, out = _prepare(path, cache, tokenizer=own)
    assert "Data: prepared" in out and c.tokenizer == own and c.folder != folder
    assert c.ids.tolist() == own.encode(_read(path)).tolist()
    plain, out = _prepare(path, cache)
    assert "prepared before" in out and plain.folder == folder
    assert plain.tokenizer == CharTokenizer.from_text(_read(path)) != own
    assert "prepared before" in _prepare(path, cache, tokenizer=own)[1]          # found again, by its identity


def _read(path) -> str:
    """The whole file as text: the reference the streamed preparation must equal."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def test_a_killed_preparation_leaves_nothing_the_next_one_uses_and_is_cleared(tmp_path):
    path = _write(tmp_path, TEXT)
    folder = corpus.cache_folder(path, "char", None, str(tmp_path / "cache"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = os.path.join(os.path.dirname(folder), f".prepare-{int(dead.stdout)}-x")
    os.makedirs(os.path.join(abandoned, "big"))
    alive = os.path.join(os.path.dirname(folder), f".prepare-{os.getpid()}-y")      # a preparation in progress
    os.makedirs(alive)
    c, _ = _prepare(path, tmp_path / "cache")
    assert not os.path.exists(abandoned) and os.path.exists(alive)
    assert c.ids.tolist() == CharTokenizer.from_text(TEXT).encode(TEXT).tolist()


@pytest.mark.parametrize("content, said", [
    (b"ok \xff bad", "is not UTF-8 text .invalid byte at offset 3.; convert it"),
    (b"a" * 40 + b"\xe2\x82", "invalid byte at offset 40"),             # cut inside a character at the end
    (b"", "is empty"),
])
def test_bad_text_is_one_error_with_the_absolute_offset(tmp_path, content, said):
    path = _write(tmp_path, content)
    old = corpus.CHUNK_BYTES
    corpus.CHUNK_BYTES = 7
    try:
        with pytest.raises(DataError, match=said):
            _prepare(path, tmp_path / "cache")
    finally:
        corpus.CHUNK_BYTES = old


@given(text=st.text(alphabet="ab \n", max_size=300), piece=st.sampled_from([4, 16]))
def test_bpe_pieces_join_back_and_stay_bounded_without_newlines(text, piece):
    from minitx_fn import tokenizer as ours
    old = ours.BPE_PIECE_CHARS, ours.BPE_HARD_CUT_CHARS
    ours.BPE_PIECE_CHARS, ours.BPE_HARD_CUT_CHARS = piece, 3
    try:
        pieces = BPETokenizer.pieces(text)
    finally:
        ours.BPE_PIECE_CHARS, ours.BPE_HARD_CUT_CHARS = old
    assert "".join(pieces) == text and all(pieces)
    assert all(len(p) <= 2 * piece for p in pieces)


def test_a_long_file_name_still_makes_a_cache_folder(tmp_path):
    path = _write(tmp_path, TEXT, "a" * 250 + ".txt")
    c, _ = _prepare(path, tmp_path / "cache")
    assert len(os.path.basename(os.path.dirname(c.folder))) <= 113


def test_the_vocab_size_is_for_bpe_only():
    with pytest.raises(DataError, match="fixed vocabulary"):
        corpus.check_choice("char", 300)
    with pytest.raises(DataError, match="must lie in"):
        corpus.check_choice("bpe", 10)


@needs_tokenizers
def test_bpe_preparation_splits_the_text_and_learns_from_the_training_part_only(tmp_path):
    text = TEXT + "ZQZQZQ validation only " * 30                     # in the last 10% only
    path = _write(tmp_path, text)
    c, _ = _prepare(path, tmp_path / "cache", kind="bpe", vocab_size=300)
    assert c.tokenizer.decode(c.train) + c.tokenizer.decode(c.validation) == text
    cut = corpus._bpe_split(text)
    assert c.tokenizer.decode(c.validation) == text[cut:]
    assert all("ZQ" not in token for token in c.tokenizer._hf.get_vocab())          # never merged: not seen
    again, out = _prepare(path, tmp_path / "cache", kind="bpe", vocab_size=300)
    assert "prepared before" in out and again.tokenizer == c.tokenizer


# ----------------------------------------------------------------------------- batches and evaluation


@given(step=st.integers(0, 2**31 - 1), dtype=st.sampled_from([np.uint8, np.uint16, np.uint32]))
def test_memory_mapped_batches_equal_device_batches_bit_for_bit(tmp_path_factory, step, dtype):
    ids = (np.arange(500) * 7919 % 251).astype(dtype)
    path = tmp_path_factory.mktemp("m") / "ids.bin"
    ids.tofile(path)
    mapped = np.memmap(path, dtype=dtype, mode="r")
    key = train.keys(3).data
    host = data.host_batch_at(mapped, key, step, batch_size=4, context=16)
    device = train.batch_at(jnp.asarray(ids.astype(np.int32)), key, jnp.int32(step), batch_size=4, context=16)
    for a, b in zip(host, device):
        assert a.dtype == b.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_prefetcher_gives_batches_in_order_and_raises_the_workers_error():
    def make(t):
        if t == 4:
            raise ValueError("no batch 4")
        return t * 10

    with data.Prefetcher(make, start=2) as next_batch:
        assert [next_batch(2), next_batch(3)] == [20, 30]
        with pytest.raises(ValueError, match="no batch 4"):
            next_batch(4)
    with data.Prefetcher(make, start=0) as next_batch:
        with pytest.raises(ValueError, match="expected step 0"):
            next_batch(1)


def test_the_validation_sample_is_fixed_and_all_is_every_window():
    ids = np.arange(10_000) % 97
    every = data.eval_windows(ids, 16)
    assert len(every) == (10_000 - 1) // 16
    a, b = data.eval_windows(ids, 16, 1000), data.eval_windows(ids, 16, 1000)
    assert len(a) == 63 and a.starts.tolist() == b.starts.tolist()             # ceil(1000 / 16), the same windows
    assert set(a.starts.tolist()) <= set(every.starts.tolist())
    assert np.array_equal(np.asarray(a), np.asarray(every)[a.starts // 16])
    assert len(data.eval_windows(ids, 16, 10**9)) == len(every)              # more than there is: all


# ----------------------------------------------------------------------------- the command line


@pytest.fixture
def _chdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _losses(run_dir):
    return [r["loss"] for r in runs.read_records(os.path.join(run_dir, runs.METRICS)).records]


@pytest.mark.usefixtures("_chdir")
def test_memory_mapped_training_equals_device_training_and_resumes_exactly_on_the_same_text(tmp_path, capsys):
    path = _write(tmp_path, TEXT)
    common = [*TINY, "--data", path, "--log-every", "1", "--eval-every", "3", "--max-new-tokens", "5",
              "--decay-steps", "6", "--warmup", "2"]
    code, out, err = run_main(capsys, "train", *common, "--steps", "6", "--out", "device", "--batches", "device")
    assert code == 0, err
    assert "sampled on the device" in out
    code, out, err = run_main(capsys, "train", *common, "--steps", "3", "--out", "mapped", "--batches", "memmap")
    assert code == 0, err
    assert "memory-mapped" in out and "prepared before" in out
    code, out, err = run_main(capsys, "train", "--resume", "mapped", "--steps", "6", "--max-new-tokens", "5")
    assert code == 0, err
    assert _losses("mapped") == _losses("device")
    val = [r.get("val_loss") for r in runs.read_records("mapped/metrics.jsonl").records]
    assert val == [r.get("val_loss") for r in runs.read_records("device/metrics.jsonl").records]
    # Resuming on an edited text is refused after one SHA-256, before any encoding.
    open(path, "a").write("an edit")
    code, out, err = run_main(capsys, "train", "--resume", "mapped", "--steps", "9")
    assert_one_error_line(code, err, "changed since the run trained on it")
    assert "Data: prepared" not in out


@pytest.mark.usefixtures("_chdir")
def test_prepare_then_train_byte_and_generate_any_text(tmp_path, capsys):
    path = _write(tmp_path, TEXT)
    code, out, err = run_main(capsys, "prepare", "--data", path, "--tokenizer", "byte")
    assert code == 0, err
    assert "byte (256 ids)" in out and f"minitx train --data {path} --tokenizer byte" in out
    code, out, err = run_main(capsys, "train", *TINY, "--data", path, "--tokenizer", "byte", "--steps", "2",
                              "--out", "b", "--max-new-tokens", "5", "--eval-tokens", "20")
    assert code == 0, err
    assert "prepared before" in out and "vocabulary 256 (byte)" in out and "(a fixed sample)" in out
    assert checkpoint_kind("b") == "byte"
    code, out, err = run_main(capsys, "generate", "--checkpoint", "b", "--prompt", "∑ never seen 🙂",
                              "--max-new-tokens", "7", "--top-k", "3")
    assert code == 0, err
    assert out.startswith("∑ never seen 🙂")
    # A byte that is not UTF-8 (a lone surrogate in Python) in the prompt or stop string: one line.
    for flags in (["--prompt", "ab\udcff"], ["--prompt", "a", "--stop", "\udcff"]):
        code, _, err = run_main(capsys, "generate", "--checkpoint", "b", *flags)
        assert_one_error_line(code, err, "not UTF-8")
    # Resuming keeps the run's tokenizer.
    code, _, err = run_main(capsys, "train", "--resume", "b", "--steps", "3", "--tokenizer", "char")
    assert_one_error_line(code, err, "keeps the run's tokenizer")


def checkpoint_kind(run_dir) -> str:
    return json.load(open(os.path.join(run_dir, "checkpoint", "meta.json")))["tokenizer"]["kind"]


@pytest.mark.parametrize("argv, said", [
    (["prepare"], "--data"),
    (["prepare", "--data", "x", "--tokenizer", "words"], "invalid choice: 'words'"),
    (["prepare", "--data", "x", "--vocab-size", "12"], "must lie in [256"),
    (["prepare", "--data", "nope.txt"], "does not exist"),
    (["prepare", "--data", ".", "--tokenizer", "byte"], "is a directory"),
    (["train", "--eval-tokens", "0"], "--eval-tokens: 0 must lie in"),
    (["train", "--eval-tokens", "some"], "is not a whole number"),
    (["train", "--batches", "disk"], "invalid choice: 'disk'"),
    (["train", "--tokenizer", "char", "--vocab-size", "300"], "--vocab-size 300 is for bpe"),
    (["prepare", "--data", "x", "--cache-dir", ""], "--cache-dir: is empty"),
])
def test_bad_data_flags_are_one_line(_chdir, capsys, argv, said):
    code, _, err = run_main(capsys, *argv)
    assert_one_error_line(code, err, said)


def test_an_unwritable_cache_is_one_line(_chdir, tmp_path, capsys):
    path = _write(tmp_path, TEXT)
    blocker = _write(tmp_path, "a file", "blocker")
    code, _, err = run_main(capsys, "prepare", "--data", path, "--cache-dir", os.path.join(blocker, "sub"))
    assert_one_error_line(code, err, "cannot write the cache")


def test_bpe_without_its_library_is_one_line(_chdir, tmp_path, capsys, monkeypatch):
    path = _write(tmp_path, TEXT)
    monkeypatch.setitem(sys.modules, "tokenizers", None)                   # import tokenizers -> ImportError
    code, _, err = run_main(capsys, "prepare", "--data", path, "--tokenizer", "bpe")
    assert_one_error_line(code, err, "pip install", ".[bpe]")


def test_a_tokens_file_with_ids_beyond_the_vocabulary_is_rebuilt(tmp_path):
    """A tokens.bin copied in from elsewhere with its time kept (cp -p, rsync -a): the
    size and time match, the ids do not fit the tokenizer. Said, naming the cache, and
    rebuilt (it used to end in an IndexError, or a non-finite loss)."""
    path = _write(tmp_path, TEXT)
    first, _ = _prepare(path, tmp_path / "cache")
    tokens = os.path.join(first.folder, "tokens.bin")
    stat = os.stat(tokens)
    raw = bytearray(open(tokens, "rb").read())
    raw[7] = 250                                                   # the char vocabulary is far smaller
    open(tokens, "wb").write(bytes(raw))
    os.utime(tokens, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again, out = _prepare(path, tmp_path / "cache")
    assert f"The cache {first.folder} has token ids up to 250, beyond its tokenizer's" in out
    expected = CharTokenizer.from_text(TEXT).encode(TEXT)
    assert int(again.ids.max()) < again.tokenizer.vocab_size and again.ids.tolist() == expected.tolist()


def test_a_file_that_changes_while_it_is_prepared_is_refused_or_recorded_as_encoded(tmp_path, monkeypatch):
    """The SHA-256 a cache records is that of exactly the bytes it encoded: a file that
    grows meanwhile is prepared as it was (its later bytes are for the next run, which
    sees another file); one edited meanwhile is one line, and nothing is cached."""
    path = _write(tmp_path, TEXT)
    real = corpus._source_sha256
    edit = {}

    def then_changes(*args):
        digest = real(*args)
        with open(path, "r+b" if edit["how"] == "edit" else "ab") as f:
            f.write(b"X" if edit["how"] == "edit" else b"more text appended meanwhile")
        return digest

    monkeypatch.setattr(corpus, "_source_sha256", then_changes)
    edit["how"] = "grow"
    c, _ = _prepare(path, tmp_path / "cache")
    assert c.source["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest() and len(c.ids) == len(TEXT)
    _write(tmp_path, TEXT)
    edit["how"] = "edit"
    with pytest.raises(DataError, match="changed while it was being prepared"):
        _prepare(path, tmp_path / "cache2")
    assert not os.path.exists(tmp_path / "cache2")


def test_a_full_cache_disk_is_a_storage_failure_that_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """Exit 1 (the disk failed), not 2 (bad input), and the folders it made are gone."""
    import errno
    path = _write(tmp_path, TEXT)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(corpus.json, "dump", full)
    code, _, err = run_main(capsys, "prepare", "--data", path, "--cache-dir", str(tmp_path / "cache"))
    assert_one_error_line(code, err, "No space left on device", status=1)
    assert not os.path.exists(tmp_path / "cache")                  # every folder it made, removed


@needs_tokenizers
def test_a_bpe_run_whose_vocabulary_came_out_smaller_finds_its_own_cache(tmp_path):
    """Asked for 300 ids, BPE learns fewer from a small text; a resumed run gives that
    tokenizer back, and its cache is found by the tokenizer itself, not prepared again
    into a second folder."""
    path = _write(tmp_path, TEXT)
    learned, _ = _prepare(path, tmp_path / "cache", kind="bpe", vocab_size=2000)
    assert learned.tokenizer.vocab_size < 2000
    again, out = _prepare(path, tmp_path / "cache", tokenizer=learned.tokenizer)
    assert "prepared before" in out and again.folder == learned.folder
    assert len(os.listdir(os.path.dirname(learned.folder))) == 1
