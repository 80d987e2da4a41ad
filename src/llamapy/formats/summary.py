"""A model's vital statistics, as `llamapy info` shows them (a plain, JSON-ready dict).

The JSON form is a stable interface (documented in docs/cli.md); add keys, never rename.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from gguf import Keys

from llamapy.formats import GGUFFile, HFFolder

SUMMARY_VERSION = 1


def _tokenizer_summary(model: GGUFFile | HFFolder) -> dict[str, Any]:
    if isinstance(model, GGUFFile):
        tokens = model.get(Keys.Tokenizer.LIST)
        return {
            "model": model.get(Keys.Tokenizer.MODEL),
            "pre": model.get(Keys.Tokenizer.PRE),
            "vocab_size": len(tokens) if tokens is not None else None,
        }
    path = model.path / "tokenizer.json"
    if not path.is_file():
        return {"model": None, "pre": None, "vocab_size": None}
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        tok_model = spec.get("model") or {}
        vocab = tok_model.get("vocab") or {}
        added = {t.get("id") for t in spec.get("added_tokens") or [] if isinstance(t, dict)}
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        return {"model": tok_model.get("type"), "pre": None, "vocab_size": len(ids | added)}
    except (OSError, ValueError, AttributeError, TypeError):
        return {"model": "unreadable", "pre": None, "vocab_size": None}


def _quant_mix(model: GGUFFile | HFFolder) -> tuple[list[dict[str, Any]], int, int]:
    mix: dict[str, dict[str, Any]] = {}
    total_params = total_bytes = 0
    for info in model.tensor_infos.values():
        entry = mix.setdefault(
            info.qtype.name, {"type": info.qtype.name, "tensors": 0, "params": 0, "bytes": 0}
        )
        entry["tensors"] += 1
        entry["params"] += info.numel
        entry["bytes"] += info.nbytes
        total_params += info.numel
        total_bytes += info.nbytes
    for entry in mix.values():
        params = entry["params"]
        entry["bits_per_weight"] = round(8 * entry["bytes"] / params, 4) if params else None
    ordered = sorted(mix.values(), key=lambda e: -e["bytes"])
    return ordered, total_params, total_bytes


def summarize(
    model: GGUFFile | HFFolder, *, source: str | None = None, with_tensors: bool = False
) -> dict[str, Any]:
    """Everything `llamapy info` reports about an opened model."""
    cfg = model.config
    quant_mix, params, nbytes = _quant_mix(model)
    summary: dict[str, Any] = {
        "summary_version": SUMMARY_VERSION,
        "path": str(model.path),
        "source": source,
        "format": model.kind,
        "file_size": model.file_size,
        "name": cfg.name,
        "architecture": cfg.arch,
        "hyperparameters": _hyperparameters(cfg),
        "parameters": params,
        "tensor_bytes": nbytes,
        "bits_per_weight": round(8 * nbytes / params, 4) if params else None,
        "quant_mix": quant_mix,
        "tokenizer": _tokenizer_summary(model),
        "chat_template": model.chat_template is not None,
    }
    if isinstance(model, GGUFFile):
        summary["gguf_version"] = model.version
    else:
        summary["unmapped_tensors"] = list(model.unmapped)
    if with_tensors:
        summary["tensors"] = [
            {
                "name": info.name,
                "type": info.qtype.name,
                "shape": list(info.shape),
                "params": info.numel,
                "bytes": info.nbytes,
            }
            for info in model.tensor_infos.values()
        ]
    return summary


def _hyperparameters(cfg: Any) -> dict[str, Any]:
    hp = asdict(cfg)
    for key in ("arch", "name"):
        hp.pop(key)
    hp["sliding_layers"] = list(hp["sliding_layers"])
    return hp
