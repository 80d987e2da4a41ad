"""`llamapy mkmodel OUT.gguf`: a random-weight llama GGUF of a real shape, for speed work.

Weights are N(0, 0.02), norms are 1, rope base 500000, context 8192 (as the shared GPU
recipe `mkmodel.py` makes them); the tokenizer is copied from another GGUF, so the file runs
in llamapy and in llama.cpp alike. Embeddings are tied (no `output.weight`), as in
SmolLM2-135M and Llama-3.2-1B.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import Keys, LlamaFileType

from llamapy.errors import UsageError
from llamapy.formats.gguf_writer import PendingTensor, TensorEntry, write_gguf
from llamapy.hub import DEFAULT_MODEL
from llamapy.quant.types import QuantType, block_size

WRITABLE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32")
_CAST_DTYPES = {QuantType.F32: torch.float32, QuantType.F16: torch.float16}
_CAST_DTYPES[QuantType.BF16] = torch.bfloat16
WEIGHT_STD = 0.02
ROPE_BASE = 500_000.0
CONTEXT_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class ModelShape:
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn: int

    def __post_init__(self) -> None:
        for name in ("hidden", "num_layers", "num_heads", "num_kv_heads", "ffn"):
            if getattr(self, name) <= 0:
                raise ValueError(f"shape: {name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.num_heads:
            raise ValueError(f"shape: hidden {self.hidden} is not a multiple of heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"shape: heads {self.num_heads} is not a multiple of KV heads")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


SHAPES = {
    "smollm2-135m": ModelShape(576, 30, 9, 3, 1536),
    "llama-3.2-1b": ModelShape(2048, 16, 32, 8, 8192),
}


def parse_shape(text: str) -> ModelShape:
    """A named shape (`SHAPES`) or `HIDDEN,LAYERS,HEADS,KV_HEADS,FFN`."""
    if text in SHAPES:
        return SHAPES[text]
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 5:
        names = ", ".join(SHAPES)
        raise ValueError(f"--shape must be one of {names} or HIDDEN,LAYERS,HEADS,KV_HEADS,FFN")
    return ModelShape(*values)


def _file_type(qtype: QuantType) -> LlamaFileType:
    return (
        LlamaFileType.ALL_F32 if qtype == QuantType.F32 else LlamaFileType[f"MOSTLY_{qtype.name}"]
    )


def _metadata(shape: ModelShape, vocab: dict, qtype: QuantType) -> dict:
    arch = "llama"
    md = {
        Keys.General.NAME: "random",
        Keys.LLM.BLOCK_COUNT.format(arch=arch): shape.num_layers,
        Keys.LLM.CONTEXT_LENGTH.format(arch=arch): CONTEXT_LENGTH,
        Keys.LLM.EMBEDDING_LENGTH.format(arch=arch): shape.hidden,
        Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch): shape.ffn,
        Keys.Attention.HEAD_COUNT.format(arch=arch): shape.num_heads,
        Keys.Attention.HEAD_COUNT_KV.format(arch=arch): shape.num_kv_heads,
        Keys.Rope.FREQ_BASE.format(arch=arch): ROPE_BASE,
        Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch): 1e-5,
        Keys.General.FILE_TYPE: int(_file_type(qtype)),
        Keys.LLM.VOCAB_SIZE.format(arch=arch): len(vocab[Keys.Tokenizer.LIST]),
        Keys.Rope.DIMENSION_COUNT.format(arch=arch): shape.head_dim,
    }
    if qtype not in _CAST_DTYPES:
        md[Keys.General.QUANTIZATION_VERSION] = 2  # GGML_QNT_VERSION
    return md | vocab


def _tensor_plan(
    shape: ModelShape, n_vocab: int, qtype: QuantType, output_qtype: QuantType, gen: torch.Generator
) -> list[TensorEntry]:
    """Every tensor in file order; weights are drawn from `gen` when written (in this order)."""

    def weight(rows: int, cols: int, q: QuantType) -> TensorEntry:
        def make() -> torch.Tensor:
            w = torch.randn(rows, cols, generator=gen).mul_(WEIGHT_STD)
            # float types: a plain cast (round to nearest even, as the quantizer for finite x)
            return w.to(_CAST_DTYPES[q]) if q in _CAST_DTYPES else w

        return PendingTensor((rows, cols), make), q

    ones = torch.ones(shape.hidden)
    h, hd = shape.hidden, shape.head_dim
    plan: list[TensorEntry] = [
        ("token_embd.weight", *weight(n_vocab, h, output_qtype)),
        ("output_norm.weight", ones, None),
    ]
    for i in range(shape.num_layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", ones, None),
            (p + "ffn_norm.weight", ones, None),
            (p + "attn_q.weight", *weight(shape.num_heads * hd, h, qtype)),
            (p + "attn_k.weight", *weight(shape.num_kv_heads * hd, h, qtype)),
            (p + "attn_v.weight", *weight(shape.num_kv_heads * hd, h, qtype)),
            (p + "attn_output.weight", *weight(h, shape.num_heads * hd, qtype)),
            (p + "ffn_gate.weight", *weight(shape.ffn, h, qtype)),
            (p + "ffn_up.weight", *weight(shape.ffn, h, qtype)),
            (p + "ffn_down.weight", *weight(h, shape.ffn, qtype)),
        ]
    return plan


def make_random_llama(
    out: str | os.PathLike[str],
    shape: ModelShape,
    vocab: str | os.PathLike[str] | None = None,
    qtype: QuantType = QuantType.Q4_0,
    *,
    output_qtype: QuantType | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight llama GGUF with the tokenizer of `vocab` (a GGUF path or alias;
    default the default model's). `output_qtype` is the embedding's type (default `qtype`)."""
    from llamapy.formats.gguf_file import GGUFFile
    from llamapy.hub import resolve_model

    resolved = resolve_model(vocab or DEFAULT_MODEL)
    if resolved.kind != "gguf":
        raise UsageError(f"--vocab must be a GGUF file; {resolved.path} is a {resolved.kind} model")
    with GGUFFile(resolved.path) as f:
        keys = [k for k in f.metadata if k.startswith("tokenizer.")]
        tok = {k: f.metadata[k] for k in keys}
        types = {k: f.metadata_types[k] for k in keys}
    if Keys.Tokenizer.LIST not in tok:
        raise UsageError(f"{resolved.path} has no tokenizer vocabulary ({Keys.Tokenizer.LIST})")
    gen = torch.Generator().manual_seed(seed)
    plan = _tensor_plan(shape, len(tok[Keys.Tokenizer.LIST]), qtype, output_qtype or qtype, gen)
    return write_gguf(out, "llama", _metadata(shape, tok, qtype), plan, metadata_types=types)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mkmodel",
        help="write a random-weight llama GGUF of a real shape (for benchmarks)",
        description="Write a llama GGUF with random N(0, 0.02) weights of a real model's "
        "shape, quantized with llamapy's quantizer, and the tokenizer of another GGUF.",
    )
    p.add_argument("out", metavar="OUT.gguf")
    p.add_argument(
        "--shape",
        default="smollm2-135m",
        help=f"{' | '.join(SHAPES)} | HIDDEN,LAYERS,HEADS,KV_HEADS,FFN (default smollm2-135m)",
    )
    p.add_argument(
        "--vocab",
        default=None,
        metavar="GGUF",
        help=f"GGUF file or alias whose tokenizer to copy (default {DEFAULT_MODEL})",
    )
    p.add_argument("--type", default="Q4_0", help=f"weight type: {', '.join(WRITABLE_TYPES)}")
    p.add_argument("--output-type", default=None, help="embedding type (default: --type)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def _qtype(text: str, flag: str) -> QuantType:
    if text.upper() not in WRITABLE_TYPES:
        raise UsageError(f"{flag} must be one of {', '.join(WRITABLE_TYPES)}, got {text!r}")
    return QuantType[text.upper()]


def run(args: argparse.Namespace) -> int:
    try:
        shape = parse_shape(args.shape)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    qtype = _qtype(args.type, "--type")
    output_qtype = _qtype(args.output_type, "--output-type") if args.output_type else None
    for q in {qtype, output_qtype or qtype}:
        bs = block_size(q)
        if shape.hidden % bs or shape.ffn % bs:
            raise UsageError(f"{q.name} needs HIDDEN and FFN to be multiples of {bs}")
    t0 = time.perf_counter()
    try:
        path = make_random_llama(
            args.out, shape, args.vocab, qtype, output_qtype=output_qtype, seed=args.seed
        )
    except OSError as e:
        raise UsageError(f"cannot write {args.out}: {e.strerror or e}") from None
    size = path.stat().st_size
    print(
        f"wrote {path} ({size / 2**20:.1f} MiB, {qtype.name}) in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return 0
