"""Small GGUF files for tests, written with gguf-py's own GGUFWriter."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch


def write_tiny_llama(
    path: Path,
    *,
    n_layers: int = 2,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 128,
    vocab: int = 32,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0,
    rng: np.random.Generator | None = None,
    types: dict[str, gguf.GGMLQuantizationType] | None = None,
    matrix_scale: float = 1.0,
    context_length: int = 256,
) -> Path:
    """A llama-architecture GGUF with random weights (quantized with gguf-py): matrices in
    `qtype`, or the type `types` gives for their name ("blk.0.attn_v.weight"), or for their
    name in every layer ("attn_v.weight"). Matrices are N(0, matrix_scale^2), norm weights
    N(0, 1): with the default, attention scores run to the hundreds (softmax ~ argmax, so
    float32 rounding can swing a row); 1 / sqrt(hidden) keeps activations O(1)."""
    rng = rng or np.random.default_rng()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_token_scores([float(-i) for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_array("test.floats", [0.5, -1.25, 3.0])
    w.add_array("test.strings", ["héllo", "", "🦙 llama"])
    w.add_bool("test.flag", True)
    w.add_int64("test.i64", -(2**40))
    w.add_float64("test.f64", 2.5)

    def add(name: str, shape: tuple[int, ...], quant: gguf.GGMLQuantizationType) -> None:
        if quant != gguf.GGMLQuantizationType.F32 and types:
            quant = types.get(name, types.get(name.split(".", 2)[-1], quant))
        x = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) == 2:
            x *= matrix_scale
        if quant == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        else:
            try:
                q = gguf.quants.quantize(x, quant)
            except NotImplementedError:  # the k-quants: llama.cpp's blocks, from llamapy
                from llamapy.quant.quantize import quantize
                from llamapy.quant.types import QuantType

                q = quantize(torch.from_numpy(x), QuantType(int(quant))).numpy()
            w.add_tensor(name, q, raw_dtype=quant)

    f32 = gguf.GGMLQuantizationType.F32
    add("token_embd.weight", (vocab, hidden), qtype)
    add("output_norm.weight", (hidden,), f32)
    head_dim = hidden // n_heads
    for i in range(n_layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), f32)
        add(f"blk.{i}.attn_q.weight", (hidden, hidden), qtype)
        add(f"blk.{i}.attn_k.weight", (n_kv_heads * head_dim, hidden), qtype)
        add(f"blk.{i}.attn_v.weight", (n_kv_heads * head_dim, hidden), qtype)
        add(f"blk.{i}.attn_output.weight", (hidden, hidden), qtype)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), f32)
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden), qtype)
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden), qtype)
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
