"""llama.cpp (llama-cpp-python) as the oracle of the quantize / convert tests, and tiny F16
GGUF files of llama shape written with gguf-py."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest

try:
    import llama_cpp
except ImportError:  # the tests that need it skip (see `needs_llama_cpp`)
    llama_cpp = None
else:

    @llama_cpp.llama_log_callback
    def _quiet(level, text, user_data):  # noqa: ARG001
        return None

    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))

needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None, reason="llama-cpp-python (llama.cpp itself, the oracle) is not installed"
)


def quantize_with_llama_cpp(
    src: Path,
    dst: Path,
    ftype: int,
    *,
    pure: bool = False,
    output_tensor_type: int | None = None,
    token_embedding_type: int | None = None,
    leave_output_tensor: bool = False,
    imatrix: dict[str, np.ndarray] | None = None,
) -> Path:
    """llama_model_quantize with the given llama_model_quantize_params."""
    L = llama_cpp.llama_cpp
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    params.pure = pure
    params.allow_requantize = True
    params.quantize_output_tensor = not leave_output_tensor
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type
    keep = []
    if imatrix is not None:
        entries = (L.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        params.imatrix = entries
        keep.append(entries)
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, "llama_model_quantize failed"
    return dst


def write_f16_llama(
    path: Path,
    rng: np.random.Generator,
    *,
    n_layers: int = 8,
    hidden: int = 256,
    n_heads: int = 4,
    n_kv_heads: int = 1,
    ffn: int = 320,
    vocab: int = 64,
    tied: bool = False,
) -> Path:
    """A llama GGUF with F16 matrices and F32 norms (random weights, a dummy vocabulary)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)

    def add(name: str, shape: tuple[int, ...]) -> None:
        if len(shape) == 1:
            w.add_tensor(name, (rng.random(shape, dtype=np.float32) + 0.5))
        else:
            scale = 1.0 / np.sqrt(shape[-1])
            w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float16))

    head_dim = hidden // n_heads
    add("token_embd.weight", (vocab, hidden))
    add("output_norm.weight", (hidden,))
    if not tied:
        add("output.weight", (vocab, hidden))
    for i in range(n_layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,))
        add(f"blk.{i}.attn_q.weight", (hidden, hidden))
        add(f"blk.{i}.attn_k.weight", (n_kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_v.weight", (n_kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_output.weight", (hidden, hidden))
        add(f"blk.{i}.ffn_norm.weight", (hidden,))
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
