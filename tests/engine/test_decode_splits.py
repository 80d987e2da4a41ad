"""The decode graphs' attention split rule (`engine.model_runner.graph_decode_splits`): a
pure function of the batch, its KV heads, its longest sequence and the SM count (the graphs
that use it: tests/engine/test_cuda_graphs.py, GPU only)."""

from __future__ import annotations


def test_decode_split_rule() -> None:
    from llamapy.engine.model_runner import SPLIT_MIN_KEYS, graph_decode_splits

    assert graph_decode_splits(1, 8) == 256 == graph_decode_splits(1, 8, 100_000)
    # one sequence: as many splits as 16-key tiles (at least two), up to 256
    lengths = (1, 16, 17, 33, 64, 65, 129, 256, 257, 513, 1024, 1025, 4096, 4097)
    assert [graph_decode_splits(1, 8, n) for n in lengths] == [
        2, 2, 2, 4, 4, 8, 16, 16, 32, 64, 64, 128, 256, 256
    ]  # fmt: skip
    assert graph_decode_splits(1, 3, 100_000) == 256  # SmolLM2's three KV heads
    # a batch: up to 32 (four sequences of 4096 keys did not gain from 64)
    assert graph_decode_splits(2, 8, 4096) == 32 == graph_decode_splits(4, 8, 100_000)
    assert graph_decode_splits(64, 8) == 4  # any length
    assert graph_decode_splits(64, 8, 256, num_sms=132) == 1  # 512 programs, short keys
    assert graph_decode_splits(64, 8, SPLIT_MIN_KEYS + 1, num_sms=132) == 2
    assert graph_decode_splits(64, 8, 100_000, num_sms=132) == 4  # capped by the batch rule
    assert graph_decode_splits(32, 8, 256, num_sms=132) == 8  # 256 programs < 2 an SM
    assert graph_decode_splits(32, 8, 64, num_sms=132) == 4  # ... cut by its 16-key tiles
    assert graph_decode_splits(256, 8, 4096, num_sms=132) == 1


def test_decode_short_splits_switch(monkeypatch) -> None:
    from llamapy.engine.model_runner import graph_decode_splits

    monkeypatch.setenv("LLAMAPY_GPU_DECODE_SHORT_SPLITS", "0")
    assert graph_decode_splits(1, 8, 64) == 32  # the batch's rule at every length
    assert graph_decode_splits(1, 8, 4096) == 32  # ... up to the batches' most
    assert graph_decode_splits(64, 8, 256, num_sms=132) == 1  # the long-batch rule stays


def test_decode_tile_rule() -> None:
    """A graph whose splits a small batch's length cut takes 16-key tiles (one a split);
    the batch's own split count, and any batch of two programs an SM, the kernel's rule."""
    from llamapy.engine.model_runner import SHORT_TILE, graph_decode_splits, graph_decode_tile

    for n in (1, 16, 40, 64, 200):
        splits = graph_decode_splits(1, 8, n)
        assert graph_decode_tile(1, 8, splits) == SHORT_TILE
        assert splits * SHORT_TILE >= n  # one tile a split covers the keys
    assert graph_decode_tile(1, 8, graph_decode_splits(1, 8, 4096)) is None
    assert graph_decode_tile(32, 8, 8) is None and graph_decode_tile(32, 8, 4) == SHORT_TILE
    assert graph_decode_tile(64, 8, 1, num_sms=132) is None


def test_one_sequence_max_splits_switch(monkeypatch, caplog) -> None:
    """LLAMAPY_GPU_DECODE_MAX_SPLITS sets a single sequence's most splits (32: the rule of
    the batches); a value that is not a power of two keeps the default and says so."""
    from llamapy.engine.model_runner import ONE_SEQUENCE_MAX_SPLITS, graph_decode_splits

    monkeypatch.setenv("LLAMAPY_GPU_DECODE_MAX_SPLITS", "32")
    assert graph_decode_splits(1, 8, 4096) == 32
    assert graph_decode_splits(1, 8, 64) == 4  # short contexts as before
    monkeypatch.setenv("LLAMAPY_GPU_DECODE_MAX_SPLITS", "64")
    assert graph_decode_splits(1, 8, 4096) == 64
    assert graph_decode_splits(2, 8, 4096) == 32  # batches keep theirs
    for bad in ("48", "lots", "0"):
        monkeypatch.setenv("LLAMAPY_GPU_DECODE_MAX_SPLITS", bad)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert graph_decode_splits(1, 8, 4096) == ONE_SEQUENCE_MAX_SPLITS
        assert "LLAMAPY_GPU_DECODE_MAX_SPLITS" in caplog.text
