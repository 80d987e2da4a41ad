"""`llamapy quantize IN OUT TYPE`: llama-quantize's presets, from a GGUF or a HF folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llamapy.errors import UsageError
from llamapy.quant.presets import PRESETS, QuantOptions, parse_preset, parse_tensor_type


def register(subparsers: argparse._SubParsersAction) -> None:
    types = "\n".join(f"  {p.name:<7} {p.description}" for p in PRESETS.values())
    p = subparsers.add_parser(
        "quantize",
        help="quantize a model to a llama.cpp type (Q4_K_M, Q8_0, F16, ...)",
        description="Write IN (a .gguf of any type, dequantized first, or a Hugging Face "
        "folder) as OUT with llama-quantize's per-tensor type choices for TYPE.",
        epilog=f"types (Q3_K, Q4_K, Q5_K mean the _M mixes):\n{types}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="a .gguf file, a Hugging Face folder or an alias")
    p.add_argument("output", metavar="OUT", help="the .gguf file to write")
    p.add_argument("type", metavar="TYPE", help="a quantization type (see below)")
    p.add_argument("--pure", action="store_true", help="every tensor gets TYPE (no k-quant mix)")
    p.add_argument("--output-tensor-type", metavar="GGML_TYPE", help="type of output.weight")
    p.add_argument("--token-embedding-type", metavar="GGML_TYPE", help="type of token_embd.weight")
    p.add_argument("--leave-output-tensor", action="store_true", help="keep output.weight as it is")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (GGUF or legacy .dat)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace, has_imatrix: bool) -> QuantOptions:
    try:
        return QuantOptions(
            preset=parse_preset(args.type),
            pure=args.pure,
            output_tensor_type=_ggml_type(args.output_tensor_type),
            token_embedding_type=_ggml_type(args.token_embedding_type),
            quantize_output_tensor=not args.leave_output_tensor,
            has_imatrix=has_imatrix,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def _ggml_type(name: str | None):
    return None if name is None else parse_tensor_type(name)


def check_output(input_path: Path, output: str, force: bool) -> Path:
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"output {out} is a folder; give a .gguf file path")
    if out.exists() and input_path.exists() and out.resolve() == input_path.resolve():
        raise UsageError(f"output {out} is the input file; write to another path")
    if out.exists() and not force:
        raise UsageError(f"output {out} exists; use --force to overwrite it")
    if not out.parent.is_dir():
        raise UsageError(f"folder {out.parent} does not exist")
    return out


def run(args: argparse.Namespace) -> int:
    from llamapy.convert.quantize_model import quantize_model
    from llamapy.convert.source import open_source
    from llamapy.hub import resolve_model
    from llamapy.quant.imatrix import load_imatrix

    options = options_from_args(args, has_imatrix=args.imatrix is not None)
    resolved = resolve_model(args.input)
    out = check_output(resolved.path, args.output, args.force)
    imatrix = None
    if args.imatrix is not None:
        if not Path(args.imatrix).is_file():
            raise UsageError(f"imatrix file {args.imatrix} does not exist")
        imatrix = load_imatrix(args.imatrix)
    source = open_source(resolved.path)
    try:
        summary = quantize_model(
            source,
            out,
            options,
            imatrix,
            imatrix_path=args.imatrix,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    finally:
        source.close()
    print("\n".join(summary.lines()))
    return 0
