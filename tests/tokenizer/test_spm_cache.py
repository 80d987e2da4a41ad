"""The on-disk cache of SPM merges (tokenizer/backend.py): the same merges as pairing them,
read back instead of paired, and rebuilt when the file is missing, damaged, foreign or
cannot be written."""

from __future__ import annotations

import pickle

import pytest
from vocab_data import vocab_path

from llamapy.tokenizer import Tokenizer, backend


@pytest.fixture
def vocab(monkeypatch, tmp_path):
    vocab = Tokenizer.from_gguf(vocab_path("llama-spm")).vocab  # 32k tokens: not cached
    assert len(vocab.tokens) < backend.SPM_CACHE_MIN_TOKENS
    monkeypatch.setenv("LLAMAPY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMAPY_TOKENIZER_CACHE", raising=False)
    monkeypatch.setattr(backend, "SPM_CACHE_MIN_TOKENS", 0)  # from here on it is
    return vocab


def _no_pairing(*_):
    raise AssertionError("the merges were paired again instead of read from the cache")


def test_merges_read_back_equal_paired(vocab, monkeypatch):
    monkeypatch.setenv("LLAMAPY_TOKENIZER_CACHE", "0")
    reference = backend._build_spm(vocab)  # paired, no cache
    monkeypatch.delenv("LLAMAPY_TOKENIZER_CACHE")
    paired = backend._pair_spm_merges(vocab)
    assert len(paired) > 1000
    assert backend._spm_merges(vocab) == paired  # paired, and written
    assert backend._spm_cache_path(vocab).is_file()
    monkeypatch.setattr(backend, "_pair_spm_merges", _no_pairing)
    assert backend._spm_merges(vocab) == paired  # read back
    cached = backend._build_spm(vocab)
    for text in ("The quick brown fox, naïve café: 12345!", "  spaces\tand\nlines  ", "日本語"):
        assert cached.encode(text).ids == reference.encode(text).ids


@pytest.mark.parametrize(
    "content",
    [
        b"not a pickle",
        pickle.dumps([("a", "b")])[:-3],  # truncated
        pickle.dumps({"a": "b"}),  # not a list
        pickle.dumps([("a", 1)]),  # not string pairs
    ],
    ids=["garbage", "truncated", "dict", "not-strings"],
)
def test_damaged_or_foreign_cache_is_rebuilt(vocab, content):
    paired = backend._pair_spm_merges(vocab)
    path = backend._spm_cache_path(vocab)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert backend._spm_merges(vocab) == paired
    with open(path, "rb") as f:
        assert pickle.load(f) == paired, "the rebuilt merges replace the bad file"


class _WritesOnLoad:
    """Unpickled by plain pickle, this calls Path.write_text: a cache must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).write_text, (self.marker, "ran"))


def test_cache_naming_a_function_is_refused_unrun(vocab, tmp_path):
    marker = tmp_path / "ran"
    path = backend._spm_cache_path(vocab)
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps([_WritesOnLoad(marker)]))
    assert backend._spm_merges(vocab) == backend._pair_spm_merges(vocab)
    assert not marker.exists(), "the cache's pickle ran code"


def test_unwritable_cache_still_builds(vocab, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LLAMAPY_CACHE", str(blocker))  # its "tokenizers" folder cannot exist
    assert backend._spm_merges(vocab) == backend._pair_spm_merges(vocab)
    assert list(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("off", ["0", "off", "False"])
def test_switched_off_or_small_vocabularies_write_nothing(vocab, monkeypatch, tmp_path, off):
    monkeypatch.setenv("LLAMAPY_TOKENIZER_CACHE", off)
    backend._spm_merges(vocab)
    monkeypatch.delenv("LLAMAPY_TOKENIZER_CACHE")
    monkeypatch.setattr(backend, "SPM_CACHE_MIN_TOKENS", len(vocab.tokens) + 1)
    backend._spm_merges(vocab)
    assert not (tmp_path / "cache").exists()
