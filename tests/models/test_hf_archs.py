"""Every llama-family architecture against transformers (the oracle), from both file kinds.

Each run draws a tiny random-weight transformers model per architecture, saves it as a HF
folder, converts that folder to an F32 GGUF with llama.cpp's own converter (which permutes
Q/K rows for llama rope and stores Gemma norms as 1 + w), and checks that llamapy's logits
from either file match transformers' eager forward.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import (
    VOCAB,
    PagedRunner,
    assert_logits_close,
    convert_to_gguf,
    hf_logits,
    save_folder,
    tiny_config,
)
from tiny_models import tiny_model as make_tiny_model

from llamapy.errors import UnsupportedError
from llamapy.formats import open_model_file
from llamapy.formats.hf_folder import config_from_hf
from llamapy.models import build_causal_lm

# Architectures both file kinds must run as transformers does.
ARCHS = [
    "llama",
    "llama-gqa",
    "llama-rope-linear",
    "llama-rope-llama3",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma3",
]
# HF only: settings that llama.cpp's converter drops, so its GGUF runs differently by design
# (Mistral's sliding window; Gemma's query_pre_attn_scalar when it is not head_dim), and
# the multimodal Gemma 3 folder, whose text model we run.
HF_ONLY = ["mistral-swa", "gemma3-qscale", "gemma3-mm"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """arch -> (transformers model, its saved folder), fresh random weights each run."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"tiny model seed: {seed}")
    root = tmp_path_factory.mktemp("tiny_hf")
    out = {}
    for i, arch in enumerate(ARCHS + HF_ONLY):
        model = make_tiny_model(tiny_config(arch), seed + i)
        out[arch] = (model, save_folder(model, root / arch))
    return out


@pytest.fixture(scope="module")
def gguf_files(zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from testdata import llama_cpp_sdist

    try:
        vendor = llama_cpp_sdist()
    except RuntimeError as e:
        pytest.skip(f"llama.cpp's converter is not available: {e}")
    root = tmp_path_factory.mktemp("tiny_gguf")
    files = {arch: root / f"{arch}.gguf" for arch in ARCHS}
    convert_to_gguf(vendor, [(zoo[arch][1], files[arch]) for arch in ARCHS])
    return files


def _model_path(kind: str, arch: str, zoo, request) -> Path:
    if kind == "hf":
        return zoo[arch][1]
    return request.getfixturevalue("gguf_files")[arch]


@pytest.mark.parametrize(
    ("kind", "arch"), [("hf", a) for a in ARCHS + HF_ONLY] + [("gguf", a) for a in ARCHS]
)
def test_one_sequence(kind: str, arch: str, zoo, request) -> None:
    hf_model = zoo[arch][0]
    model = build_causal_lm(open_model_file(_model_path(kind, arch, zoo, request)))
    ids = torch.randint(0, VOCAB, (13,)).tolist()
    got = PagedRunner(model, num_seqs=1, max_len=len(ids)).step({0: ids})[0]
    assert_logits_close(got, hf_logits(hf_model, ids))


@pytest.mark.parametrize(
    ("kind", "arch"),
    [("hf", a) for a in ("llama-gqa", "qwen2", "phi3", "gemma3", "mistral-swa")]
    + [("gguf", a) for a in ("llama-gqa", "qwen3", "gemma3")],
)
def test_batched_prefill_then_decode(kind: str, arch: str, zoo, request) -> None:
    """Two sequences of different lengths share each flattened call: both prefill, then one
    decodes while the other prefills its next chunk, then both decode, all through the
    paged cache (block size 4, blocks scattered)."""
    hf_model = zoo[arch][0]
    model = build_causal_lm(open_model_file(_model_path(kind, arch, zoo, request)))
    a, b = (torch.randint(0, VOCAB, (n,)).tolist() for n in (12, 10))
    ref = {0: hf_logits(hf_model, a), 1: hf_logits(hf_model, b)}
    runner = PagedRunner(model, num_seqs=2, max_len=12)
    steps = [{0: a[:9], 1: b[:5]}, {0: a[9:10], 1: b[5:9]}, {0: a[10:11], 1: b[9:10]}]
    done = {0: 0, 1: 0}
    for chunks in steps:
        for s, logits in runner.step(chunks).items():
            n = len(chunks[s])
            assert_logits_close(logits, ref[s][done[s] : done[s] + n])
            done[s] += n


def _edit_config(folder: Path, tmp_path: Path, **changes) -> Path:
    copy = shutil.copytree(folder, tmp_path / folder.name)
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(changes)
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


def test_unsupported_rope_scaling_is_named(zoo, tmp_path: Path) -> None:
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10_000.0}
    folder = _edit_config(zoo["llama"][1], tmp_path, rope_parameters=yarn)
    with pytest.raises(UnsupportedError, match="yarn"):
        build_causal_lm(open_model_file(folder))


@pytest.mark.parametrize("arch", ["llama-rope-llama3", "phi3", "gemma3"])
def test_pre5_config_keys_read_alike(arch: str) -> None:
    """Hub checkpoints saved before transformers 5 give rope settings at top level
    (`rope_theta`, `rope_scaling`, `partial_rotary_factor`, `rope_local_base_freq`)."""
    new = tiny_config(arch).to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    params = dict(new["rope_parameters"])
    if arch == "gemma3":
        old["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        params = dict(params["full_attention"])
        old["sliding_window_pattern"] = 6
    old["rope_theta"] = params.pop("rope_theta")
    old["partial_rotary_factor"] = params.pop("partial_rotary_factor", None)
    old["rope_scaling"] = params if params.get("rope_type") != "default" else None
    name = {"llama-rope-llama3": "llama"}.get(arch, arch)
    assert config_from_hf(old, name) == config_from_hf(new, name)
    assert config_from_hf(new, name).rope_theta == old["rope_theta"]
