"""The decode graphs' attention split rule (`engine.model_runner.graph_decode_splits`): a
pure function of the batch, its KV heads, its longest sequence and the SM count (the graphs
that use it: tests/engine/test_cuda_graphs.py, GPU only)."""

from __future__ import annotations


def test_decode_split_rule() -> None:
    from llamapy.engine.model_runner import SPLIT_MIN_KEYS, graph_decode_splits

    assert graph_decode_splits(1, 8) == 32 == graph_decode_splits(1, 8, 100_000)
    assert graph_decode_splits(1, 8, 64) == 32  # one sequence: the GPU is empty, split anyway
    assert graph_decode_splits(64, 8) == 4  # any length
    assert graph_decode_splits(64, 8, 256, num_sms=132) == 1  # 512 programs, short keys
    assert graph_decode_splits(64, 8, SPLIT_MIN_KEYS + 1, num_sms=132) == 2
    assert graph_decode_splits(64, 8, 100_000, num_sms=132) == 4  # capped by the batch rule
    assert graph_decode_splits(32, 8, 256, num_sms=132) == 8  # 256 programs < 2 an SM
    assert graph_decode_splits(256, 8, 4096, num_sms=132) == 1
