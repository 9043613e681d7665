"""Corpora (`minitx_fn.corpus`): the built-in text and the train/validation split; a
text file prepared once, streamed, into a cache that is reused when valid and
rebuilt when anything is off; what a text or a cache that cannot be used says; and a
preparation that is killed, full or raced by an edit leaves nothing behind. Expected
values come from the in-memory path (a tokenizer's `encode` of the whole text)."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import io
import json
import os
import pydoc
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import corpus, signals
from minitx_fn.errors import DataError, StorageError
from minitx_fn.tokenizer import ByteTokenizer, CharTokenizer
from tests.helpers import fail_fsync, sentencepiece_style

needs_tokenizers = pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="the bpe tokenizer "
                                      "needs the optional 'tokenizers' library (pip install -e '.[bpe]')")
TEXT = "First Citizen: héllo, wörld! 😀 Before we proceed any further, hear me speak.\n" * 40


def _write(tmp_path, text: str | bytes, name="t.txt") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def _prepare(path, cache, **kw):
    out = io.StringIO()
    c = corpus.prepare(path, cache_dir=str(cache), out=out, **kw)
    return c, out.getvalue()


# ----------------------------------------------------------------------------- the built-in text, the split


def test_builtin_text_is_the_corpus_cycle():
    text = corpus.builtin_text()
    assert text == corpus.BUILTIN_CORPUS * corpus.BUILTIN_REPEATS
    assert corpus.BUILTIN_CORPUS == "hello world! hello jax! hello flax! "
    assert corpus.builtin().source == corpus.BUILTIN_SOURCE


@given(n=st.integers(1, 500))
def test_the_training_part_is_the_largest_at_most_nine_tenths(n):
    """corpus.train_boundary(n) = b: b / n <= 0.9 < (b + 1) / n, in exact rationals."""
    b = corpus.train_boundary(n)
    assert Fraction(b, n) <= Fraction(9, 10) < Fraction(b + 1, n)


def test_help_of_the_corpus_module_shows_no_environment(monkeypatch):
    """A default argument environ=os.environ printed every variable of the process in help()."""
    monkeypatch.setenv("MINITX_TEST_SECRET", "s3cr3t-value")
    assert "s3cr3t-value" not in pydoc.render_doc(corpus)


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


def test_a_long_file_name_still_makes_a_cache_folder(tmp_path):
    path = _write(tmp_path, TEXT, "a" * 250 + ".txt")
    c, _ = _prepare(path, tmp_path / "cache")
    assert len(os.path.basename(os.path.dirname(c.folder))) <= 113


def test_the_vocab_size_is_for_bpe_only():
    with pytest.raises(DataError, match="fixed vocabulary"):
        corpus.check_choice("char", 300)
    with pytest.raises(DataError, match="must lie in"):
        corpus.check_choice("bpe", 10)
    with pytest.raises(DataError, match="unknown tokenizer 'words'"):
        corpus.check_choice("words", None)


@needs_tokenizers
def test_bpe_preparation_splits_the_text_and_learns_from_the_training_part_only(tmp_path):
    text = TEXT + "ZQZQZQ validation only " * 30                     # in the last 10% only
    path = _write(tmp_path, text)
    c, _ = _prepare(path, tmp_path / "cache", kind="bpe", vocab_size=300)
    assert c.tokenizer.decode(c.train) + c.tokenizer.decode(c.validation) == text
    raw = text.encode("utf-8")
    cut = len(raw[:corpus.train_boundary(len(raw))].decode("utf-8", "ignore"))      # 90% of the bytes, at a character
    assert c.tokenizer.decode(c.validation) == text[cut:]
    vocabulary = json.loads(c.tokenizer.to_json())["model"]["vocab"]
    assert all("ZQ" not in token for token in vocabulary)                           # never merged: not seen
    again, out = _prepare(path, tmp_path / "cache", kind="bpe", vocab_size=300)
    assert "prepared before" in out and again.tokenizer == c.tokenizer


# ----------------------------------------------------------------------------- batches and evaluation


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
    sees another file); one edited meanwhile is one line, and nothing is cached. The
    file changes at the preparation's first safe point (`signals.check`, between the
    pieces it reads), which comes once its SHA-256 is taken."""
    path = _write(tmp_path, TEXT)
    real, edit = signals.check, {}

    def then_changes():
        if not edit.get("done"):
            edit["done"] = True
            with open(path, "r+b" if edit["how"] == "edit" else "ab") as f:
                f.write(b"X" if edit["how"] == "edit" else b"more text appended meanwhile")
        real()

    monkeypatch.setattr(signals, "check", then_changes)
    edit["how"] = "grow"
    c, _ = _prepare(path, tmp_path / "cache")
    assert c.source["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest() and len(c.ids) == len(TEXT)
    _write(tmp_path, TEXT)
    edit.update(how="edit", done=False)
    with pytest.raises(DataError, match="changed while it was being prepared"):
        _prepare(path, tmp_path / "cache2")
    assert not os.path.exists(tmp_path / "cache2")


def test_a_full_cache_disk_is_a_storage_failure_that_leaves_no_folder(tmp_path, monkeypatch):
    """StorageError (the disk failed: exit 1), not DataError (bad input: exit 2), and the
    folders it made are gone."""
    path = _write(tmp_path, TEXT)
    fail_fsync(monkeypatch, errno.ENOSPC)
    with pytest.raises(StorageError, match="No space left on device"):
        _prepare(path, tmp_path / "cache")
    assert not os.path.exists(tmp_path / "cache")                  # every folder it made, removed


def test_a_cache_inside_a_runs_own_files_is_refused_by_any_route(tmp_path):
    """A run replaces its checkpoint folders whole: a cache inside one (or reached
    through a link to one) would vanish at the run's next save, so it is refused,
    and nothing is made there."""
    path = _write(tmp_path, TEXT)
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    os.symlink(run / "checkpoint", tmp_path / "latest")
    for cache in (run / "checkpoint" / "cache", tmp_path / "latest" / "cache", run / "checkpoint.old"):
        with pytest.raises(DataError, match=f"'{cache}' is inside the files of the run '{run}'.*--cache-dir|cache_dir"):
            _prepare(path, str(cache))
    assert sorted(os.listdir(run)) == ["checkpoint"] and os.listdir(run / "checkpoint") == []


def test_an_unwritable_cache_is_bad_input_naming_the_cache(tmp_path):
    path = _write(tmp_path, TEXT)
    blocker = _write(tmp_path, "a file", "blocker")
    with pytest.raises(DataError, match="cannot write the cache"):
        _prepare(path, os.path.join(blocker, "sub"))


@pytest.mark.parametrize("make, said", [
    (lambda tmp: None, "does not exist"),
    (lambda tmp: (tmp / "in.txt").mkdir(), "is a directory"),
    (lambda tmp: (tmp / "in.txt").write_text(""), "is empty"),
    (lambda tmp: os.symlink(tmp / "in.txt", tmp / "in.txt"), "cannot be opened.*symbolic links"),
])
def test_a_data_path_that_is_no_text_file_is_named(tmp_path, make, said):
    make(tmp_path)
    with pytest.raises(DataError, match=f"'{tmp_path / 'in.txt'}'.* {said}"):
        corpus.check_file(str(tmp_path / "in.txt"))


def test_a_text_that_is_not_the_expected_one_is_refused_before_it_is_encoded(tmp_path):
    """A resumed run's text (expected_sha256): another text is refused after one SHA-256."""
    path = _write(tmp_path, TEXT)
    with pytest.raises(corpus.SourceChangedError, match="is not the expected text"):
        _prepare(path, tmp_path / "cache", expected_sha256=hashlib.sha256(b"another text").hexdigest())
    assert not os.path.exists(tmp_path / "cache")


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


def test_a_tokenizer_that_begins_a_text_with_bos_puts_it_once_at_the_start(tmp_path):
    """A Llama-3-style tokenizer's post-processor puts BOS before every text it encodes;
    a prepared file (cut into many pieces to encode, and at the 90% split) and a text in
    memory hold it once, at the document's start, as the model saw its documents."""
    tk = pytest.importorskip("tokenizers", reason="the BOS tokenizer needs the test extra's tokenizers")
    from minitx_fn.tokenizer import BPETokenizer
    hf = tk.Tokenizer(tk.models.WordLevel({w: i for i, w in enumerate(["<s>", "<unk>", "to", "be", "or", "not"])},
                                          unk_token="<unk>"))
    hf.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    hf.post_processor = tk.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = BPETokenizer(hf)
    assert tokenizer.encode("to be").tolist() == [0, 2, 3] and tokenizer.document_start().tolist() == [0]
    text = "to be or not to be " * 20_000                       # 360,000 characters: several pieces, two splits
    path = tmp_path / "t.txt"
    path.write_text(text)
    prepared = corpus.prepare(str(path), tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), out=io.StringIO())
    in_memory = corpus.Corpus.from_text(text, tokenizer=tokenizer)
    for made in (prepared, in_memory):
        ids = np.asarray(made.ids)
        assert ids[0] == 0 and int((ids == 0).sum()) == 1 and len(ids) == 1 + 6 * 20_000


@pytest.mark.parametrize("legacy", [False, True])
def test_a_tokenizer_that_prepends_a_space_puts_it_once_at_the_start(tmp_path, legacy):
    """Llama-2's tokenizer writes a space before every text it encodes; a prepared file
    (many pieces, two splits) and a text in memory get it once, at the document's start,
    so their ids decode to the text itself (a space at every piece and at the 90% split
    before)."""
    pytest.importorskip("tokenizers", reason="the SentencePiece-style tokenizer needs the test extra's tokenizers")
    tokenizer = sentencepiece_style(legacy)
    text = "to be or not to be\n" * 8_000                       # 152,000 characters: several pieces, two splits
    path = tmp_path / "t.txt"
    path.write_text(text)
    prepared = corpus.prepare(str(path), tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), out=io.StringIO())
    for made in (prepared, corpus.Corpus.from_text(text, tokenizer=tokenizer)):
        assert tokenizer.decode(np.asarray(made.ids)) == text
