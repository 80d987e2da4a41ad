"""`llamapy convert HF_FOLDER OUT.gguf`: a Hugging Face checkpoint as a llama.cpp GGUF."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llamapy.errors import UsageError
from llamapy.quant.presets import PRESETS, QuantOptions, parse_preset


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face folder to GGUF (as llama.cpp's convert_hf_to_gguf.py)",
        description="Write a Hugging Face safetensors folder as a GGUF file with llama.cpp's "
        "tensor names, layouts and metadata (hyperparameters, tokenizer, chat template).",
    )
    p.add_argument("folder", metavar="HF_FOLDER", help="config.json + *.safetensors + tokenizer")
    p.add_argument("output", metavar="OUT", help="the .gguf file to write")
    p.add_argument(
        "--outtype",
        default="auto",
        metavar="TYPE",
        help="f32, f16, bf16, q8_0 or any quantize type (Q4_K_M, ...); auto (default): bf16 "
        "for a bf16 checkpoint, else f16",
    )
    p.add_argument(
        "--no-vocab",
        action="store_true",
        help="write no tokenizer (llama.cpp's vocab type 'none': token ids only)",
    )
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _preset(outtype: str, source) -> QuantOptions:
    name = outtype
    if outtype.lower() == "auto":
        from llamapy.quant.types import QuantType

        stored = {t.qtype for t in source.tensors if len(t.shape) >= 2}
        name = "BF16" if stored == {QuantType.BF16} else "F16"
    try:
        return QuantOptions(preset=parse_preset(name))
    except ValueError:
        raise UsageError(
            f"unknown --outtype {outtype!r}; choose auto or one of {', '.join(PRESETS)}"
        ) from None


def run(args: argparse.Namespace) -> int:
    from llamapy.cli.quantize import check_output
    from llamapy.convert.hf_to_gguf import hf_source
    from llamapy.convert.quantize_model import quantize_model

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give a Hugging Face model folder")
    if args.outtype.lower() != "auto":
        _preset(args.outtype, None)  # a bad type fails before the folder is read
    out = check_output(folder, args.output, args.force)
    source = hf_source(folder, with_vocab=not args.no_vocab)
    try:
        summary = quantize_model(
            source,
            out,
            _preset(args.outtype, source),
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    finally:
        source.close()
    print("\n".join(summary.lines()))
    return 0
