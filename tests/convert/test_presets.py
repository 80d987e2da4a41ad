"""The type every tensor gets under each preset, against llama.cpp's llama_model_quantize
(the oracle: it writes its choices into the file it makes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from llama_cpp_tools import needs_llama_cpp, quantize_with_llama_cpp, write_f16_llama

from llamapy.formats.gguf_file import GGUFFile
from llamapy.quant.presets import (
    PRESETS,
    ModelShape,
    QuantOptions,
    TensorPlan,
    parse_preset,
    parse_tensor_type,
    plan_tensor_types,
)
from llamapy.quant.types import QuantType


def _file_types(path: Path) -> list[tuple[str, QuantType]]:
    with GGUFFile(path) as f:
        return [(name, info.qtype) for name, info in f.tensor_infos.items()]


def _plan(path: Path, options: QuantOptions) -> list[TensorPlan]:
    with GGUFFile(path) as f:
        md = f.metadata
        shape = ModelShape(
            "llama",
            md["llama.block_count"],
            md["llama.attention.head_count"],
            md["llama.attention.head_count_kv"],
        )
        tensors = [(n, i.shape, i.qtype) for n, i in f.tensor_infos.items()]
    return plan_tensor_types(tensors, shape, options)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One random shape per run: layer count (the use_more_bits bands), GQA ratio (the IQ4 /
    Q2_K attn_v rules), tied or separate output, ffn rows that 256-blocks do or do not fit."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("presets") / "m.gguf"
    return [
        write_f16_llama(
            path,
            rng,
            n_layers=int(rng.integers(4, 13)),
            n_kv_heads=int(rng.choice([1, 2, 4])),
            ffn=int(rng.choice([320, 512])),
            tied=bool(rng.integers(2)),
        )
    ]


@needs_llama_cpp
@pytest.mark.parametrize("pure", [False, True])
@pytest.mark.parametrize("name", list(PRESETS))
def test_types_match_llama_cpp(name: str, pure: bool, models: list[Path], tmp_path: Path):
    preset = PRESETS[name]
    for model in models:
        ref = quantize_with_llama_cpp(model, tmp_path / "ref.gguf", int(preset.ftype), pure=pure)
        plan = _plan(model, QuantOptions(preset, pure=pure))
        assert [(p.name, p.dst_type) for p in plan] == _file_types(ref)


@needs_llama_cpp
@pytest.mark.parametrize(
    ("name", "output", "embedding", "leave_output"),
    [
        ("Q4_K_M", QuantType.Q8_0, QuantType.Q4_0, False),
        ("Q5_0", None, QuantType.F16, False),
        ("Q6_K", QuantType.F16, None, False),
        ("Q4_0", None, None, True),
    ],
)
def test_output_and_embedding_options(name, output, embedding, leave_output, models, tmp_path):
    preset = PRESETS[name]
    for model in models:
        ref = quantize_with_llama_cpp(
            model,
            tmp_path / "ref.gguf",
            int(preset.ftype),
            output_tensor_type=None if output is None else int(output),
            token_embedding_type=None if embedding is None else int(embedding),
            leave_output_tensor=leave_output,
        )
        options = QuantOptions(
            preset,
            output_tensor_type=output,
            token_embedding_type=embedding,
            quantize_output_tensor=not leave_output,
        )
        assert [(p.name, p.dst_type) for p in _plan(model, options)] == _file_types(ref)


@needs_llama_cpp
@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "IQ4_XS", "Q4_K_M"])
def test_imatrix_changes_types_as_llama_cpp(name: str, models: list[Path], tmp_path: Path):
    """With an imatrix, Q4_0 / Q5_0 guard the first ffn_down layers and IQ4 does not."""
    preset = PRESETS[name]
    model = models[0]
    with GGUFFile(model) as f:
        imatrix = {
            n: np.ones(i.shape[-1], np.float32)
            for n, i in f.tensor_infos.items()
            if len(i.shape) == 2
        }
    ref = quantize_with_llama_cpp(model, tmp_path / "ref.gguf", int(preset.ftype), imatrix=imatrix)
    plan = _plan(model, QuantOptions(preset, has_imatrix=True))
    assert [(p.name, p.dst_type) for p in plan] == _file_types(ref)


def test_names_and_aliases() -> None:
    assert parse_preset("q4_k_m").name == "Q4_K_M"
    assert parse_preset("Q4_K").name == "Q4_K_M"  # llama-quantize's aliases
    assert parse_preset(" q5_k ").name == "Q5_K_M"
    with pytest.raises(ValueError, match="unknown quantization type 'Q9_X'.*Q4_K_M"):
        parse_preset("Q9_X")
    assert parse_tensor_type("q6_k") == QuantType.Q6_K
    with pytest.raises(ValueError, match="unknown ggml type 'Q7'"):
        parse_tensor_type("Q7")


def test_fallback_is_reported() -> None:
    """Rows of 96 fit no 256-block: Q4_K falls back to Q5_0 (tensor_type_fallback)."""
    tensors = [("blk.0.attn_q.weight", (64, 96), QuantType.F16)]
    (plan,) = plan_tensor_types(tensors, ModelShape("llama", 1), QuantOptions(PRESETS["Q4_K_S"]))
    assert plan.dst_type == QuantType.Q5_0 and plan.fallback
    tensors = [("blk.0.attn_q.weight", (64, 48), QuantType.F16)]  # not even 32-blocks
    (plan,) = plan_tensor_types(tensors, ModelShape("llama", 1), QuantOptions(PRESETS["Q4_K_S"]))
    assert plan.dst_type == QuantType.F16
