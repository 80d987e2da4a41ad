"""`llamapy info MODEL [--tensors] [--json]`: what a model file holds."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llamapy.formats import open_model_file
from llamapy.formats.summary import summarize
from llamapy.hub import DEFAULT_MODEL, resolve_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="show a model's architecture, size, quant mix and tokenizer",
        description="Show what a model file holds: architecture, hyperparameters, parameter "
        "count, quant types, tokenizer and chat template. MODEL is a .gguf path, a Hugging "
        f"Face folder, an alias or hf:ORG/REPO[/FILE.gguf] (default {DEFAULT_MODEL}).",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL")
    p.add_argument("-m", "--model", dest="model_opt", metavar="MODEL", help="same as MODEL")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.add_argument("--json", action="store_true", help="print JSON (see docs/cli.md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    resolved = resolve_model(args.model_opt or args.model)
    model = open_model_file(resolved.path)
    try:
        summary = summarize(model, source=resolved.source, with_tensors=args.tensors)
    finally:
        model.close()
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_summary(summary))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_summary(s: dict[str, Any]) -> str:
    hp = s["hyperparameters"]
    tok = s["tokenizer"]
    lines = [
        f"model:          {s['name'] or '(unnamed)'}",
        f"path:           {s['path']}",
        f"source:         {s['source']}",
        f"format:         {s['format']}, {_size(s['file_size'])}",
        f"architecture:   {s['architecture']}",
        f"parameters:     {_params(s['parameters'])} ({s['parameters']:,})",
        f"layers:         {hp['num_layers']}",
        f"width:          {hp['hidden_size']}",
        f"heads:          {hp['num_heads']} (KV heads {hp['num_kv_heads']}, "
        f"head dim {hp['head_dim']})",
        f"ffn:            {hp['ffn_size']}",
        f"context:        {hp['context_length']}",
        f"vocab:          {hp['vocab_size']}",
        f"norm:           {hp['norm_type']}, eps {hp['norm_eps']:g}",
    ]
    if hp["rope_theta"] is not None:
        rope = f"theta {hp['rope_theta']:g}"
        if hp["rope_theta_swa"]:
            rope += f" (sliding layers {hp['rope_theta_swa']:g})"
        if hp["rope_scaling"]:
            rope += f", scaling {hp['rope_scaling']['type']} x{hp['rope_scaling']['factor']:g}"
        lines.append(f"rope:           {rope}")
    if hp["sliding_window"]:
        n_sliding = sum(hp["sliding_layers"])
        lines.append(
            f"sliding window: {hp['sliding_window']} ({n_sliding} of {hp['num_layers']} layers)"
        )
    if hp["pooling"]:
        lines.append(f"pooling:        {hp['pooling']}")
    lines.append(
        f"tokenizer:      {tok['model']}"
        + (f" (pre {tok['pre']})" if tok["pre"] else "")
        + (f", {tok['vocab_size']} tokens" if tok["vocab_size"] else "")
    )
    lines.append(f"chat template:  {'yes' if s['chat_template'] else 'no'}")
    bpw = f"{s['bits_per_weight']:.2f}" if s["bits_per_weight"] else "-"
    lines.append(f"weights:        {_size(s['tensor_bytes'])}, {bpw} bits per weight")
    lines.append("quant mix:")
    lines.append(f"  {'type':<8} {'tensors':>7} {'params':>14} {'bytes':>12} {'bpw':>7}")
    for q in s["quant_mix"]:
        lines.append(
            f"  {q['type']:<8} {q['tensors']:>7} {q['params']:>14,} "
            f"{_size(q['bytes']):>12} {q['bits_per_weight'] or 0:>7.2f}"
        )
    if s.get("unmapped_tensors"):
        lines.append(f"tensors without a GGUF name: {', '.join(s['unmapped_tensors'])}")
    if "tensors" in s:
        lines.append("tensors:")
        for t in s["tensors"]:
            shape = "x".join(str(d) for d in t["shape"])
            lines.append(f"  {t['name']:<40} {t['type']:<8} {shape:<16} {_size(t['bytes']):>12}")
    return "\n".join(lines) + "\n"
