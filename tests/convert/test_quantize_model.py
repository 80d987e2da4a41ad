"""`quantize_model` writes what llama.cpp's llama_model_quantize writes: the same tensor
types, the same blocks byte for byte, the same file-type metadata; and the files load."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from llama_cpp_tools import llama_cpp, needs_llama_cpp, quantize_with_llama_cpp, write_f16_llama

from llamapy.convert.at_load import load_time_quantizer
from llamapy.convert.quantize_model import quantize_model
from llamapy.convert.source import gguf_source
from llamapy.errors import ModelFormatError, UnsupportedError
from llamapy.formats import open_model_file
from llamapy.formats.gguf_file import GGUFFile
from llamapy.models.weights import Weights
from llamapy.quant.imatrix import ImportanceMatrix
from llamapy.quant.presets import PRESETS, QuantOptions
from llamapy.quant.types import QuantType


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("qm") / "f16.gguf"
    return write_f16_llama(path, rng, n_layers=2, n_kv_heads=2, ffn=320, vocab=48, tied=False)


def _quantize(src: Path, out: Path, options: QuantOptions, imatrix=None) -> Path:
    source = gguf_source(src)
    try:
        quantize_model(source, out, options, imatrix)
    finally:
        source.close()
    return out


def assert_same_file(ours: Path, ref: Path) -> None:
    with GGUFFile(ours) as a, GGUFFile(ref) as b:
        assert [(n, i.qtype, i.shape) for n, i in a.tensor_infos.items()] == [
            (n, i.qtype, i.shape) for n, i in b.tensor_infos.items()
        ]
        differ = [n for n in a.tensor_infos if not torch.equal(a.raw(n), b.raw(n))]
        assert not differ, f"{len(differ)} tensor(s) differ from llama.cpp's, e.g. {differ[:3]}"
        for key in ("general.file_type", "general.quantization_version", "llama.block_count"):
            assert a.metadata[key] == b.metadata[key], key
            assert a.metadata_types[key] == b.metadata_types[key], key


@needs_llama_cpp
@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q3_K_M", "Q4_K_M", "IQ4_XS", "BF16"])
def test_same_bytes_as_llama_cpp(name: str, f16_model: Path, tmp_path: Path) -> None:
    preset = PRESETS[name]
    ours = _quantize(f16_model, tmp_path / "ours.gguf", QuantOptions(preset))
    ref = quantize_with_llama_cpp(f16_model, tmp_path / "ref.gguf", int(preset.ftype))
    assert_same_file(ours, ref)


@needs_llama_cpp
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K_M"])
def test_imatrix_same_bytes_as_llama_cpp(
    rng: np.random.Generator, name: str, f16_model: Path, tmp_path: Path
) -> None:
    with GGUFFile(f16_model) as f:
        values = {
            n: rng.random(i.shape[-1], dtype=np.float32) * 4
            for n, i in f.tensor_infos.items()
            if len(i.shape) == 2 and n != "token_embd.weight"
        }
    preset = PRESETS[name]
    imatrix = ImportanceMatrix(dict(values), ["random"], 1, 512)
    ours = _quantize(
        f16_model, tmp_path / "ours.gguf", QuantOptions(preset, has_imatrix=True), imatrix
    )
    ref = quantize_with_llama_cpp(
        f16_model, tmp_path / "ref.gguf", int(preset.ftype), imatrix=values
    )
    assert_same_file(ours, ref)
    with GGUFFile(ours) as f:
        assert f.metadata["quantize.imatrix.entries_count"] == len(values)
        assert f.metadata["quantize.imatrix.dataset"] == "random"


@needs_llama_cpp
def test_requantize_a_quantized_file(f16_model: Path, tmp_path: Path) -> None:
    """A Q8_0 input is dequantized first, as llama.cpp does with --allow-requantize."""
    q8 = quantize_with_llama_cpp(f16_model, tmp_path / "q8.gguf", int(PRESETS["Q8_0"].ftype))
    ours = _quantize(q8, tmp_path / "ours.gguf", QuantOptions(PRESETS["Q5_1"]))
    ref = quantize_with_llama_cpp(q8, tmp_path / "ref.gguf", int(PRESETS["Q5_1"].ftype))
    assert_same_file(ours, ref)


@needs_llama_cpp
def test_output_loads_in_llama_cpp_and_llamapy(f16_model: Path, tmp_path: Path) -> None:
    """Both runtimes read the file and agree on the logits of a random prompt."""
    from llamapy.models import build_causal_lm

    out = _quantize(f16_model, tmp_path / "q.gguf", QuantOptions(PRESETS["Q4_K_M"]))
    ids = torch.randint(0, 48, (9,)).tolist()
    lm = llama_cpp.Llama(
        str(out), logits_all=True, n_ctx=32, verbose=False, n_threads=2, type_k=0, type_v=0
    )
    lm.eval(ids)
    ref = torch.tensor(np.array(lm.scores[: len(ids)]))
    model = build_causal_lm(open_model_file(out))  # unprepared: the float32 reference
    got = _llamapy_logits(model, ids)
    # llama.cpp rounds activations to 8 bits for k-quant dot products (Q8_K), a few % of
    # noise; a misread file gives unrelated logits (cosine ~0)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min().item() > 0.99, cos


def _llamapy_logits(model, ids: list[int]) -> torch.Tensor:
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "models"))
    from tiny_models import PagedRunner

    return PagedRunner(model, num_seqs=1, max_len=len(ids)).step({0: ids})[0]


@pytest.mark.parametrize("name", ["Q4_0", "Q3_K_S"])
def test_quantize_at_load_gives_the_file_blocks(name: str, f16_model: Path, tmp_path: Path):
    """Weights quantized as they load are the blocks `llamapy quantize` writes."""
    out = _quantize(f16_model, tmp_path / "q.gguf", QuantOptions(PRESETS[name]))
    src = open_model_file(f16_model)
    w = Weights(src, load_time_quantizer(src, name))
    with GGUFFile(out) as f:
        for tname, info in f.tensor_infos.items():
            t = w.q(tname)
            assert t.qtype == info.qtype, tname
            assert torch.equal(t.data.reshape(-1), f.raw(tname)), tname


def test_quantize_at_load_of_a_hf_folder(tmp_path: Path) -> None:
    """A float HF checkpoint quantized at load runs, and equals its converted-then-quantized
    GGUF (the rope permutation moves whole rows, so the blocks are the same)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "models"))
    from tiny_models import VOCAB, save_folder, tiny_config, tiny_model

    from llamapy.convert.hf_to_gguf import hf_source
    from llamapy.models import build_causal_lm

    folder = save_folder(
        tiny_model(tiny_config("llama-gqa", hidden_size=256, intermediate_size=256), 3),
        tmp_path / "hf",
    )
    source = hf_source(folder, with_vocab=False)
    gguf_q = tmp_path / "q.gguf"
    quantize_model(source, gguf_q, QuantOptions(PRESETS["Q4_0"]))
    hf = open_model_file(folder)
    ids = torch.randint(0, VOCAB, (7,)).tolist()
    a = _llamapy_logits(build_causal_lm(hf, load_time_quantizer(hf, "Q4_0")), ids)
    b = _llamapy_logits(build_causal_lm(open_model_file(gguf_q)), ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_unsupported_type_is_named(f16_model: Path, tmp_path: Path, monkeypatch) -> None:
    import llamapy.convert.quantize_model as qm

    monkeypatch.setattr(qm, "SUPPORTED_TYPES", frozenset({QuantType.F16, QuantType.Q8_0}))
    with pytest.raises(
        UnsupportedError, match=r"quantizing to Q4_K, Q5_0, Q6_K is not supported yet \(needed for "
    ):
        _quantize(f16_model, tmp_path / "x.gguf", QuantOptions(PRESETS["Q4_K_M"]))
    assert not (tmp_path / "x.gguf").exists()


def test_imatrix_of_wrong_size(f16_model: Path, tmp_path: Path) -> None:
    bad = ImportanceMatrix({"blk.0.attn_q.weight": np.ones(7, np.float32)}, [], 0, 0)
    with pytest.raises(ModelFormatError, match="imatrix size 7 is different"):
        _quantize(f16_model, tmp_path / "x.gguf", QuantOptions(PRESETS["Q4_0"]), bad)


def test_f16_of_a_quantized_file_is_its_dequantization(tmp_path: Path) -> None:
    """`llamapy quantize IN OUT F16` on a Q4_1 file: gguf-py's dequantization, in F16."""
    from gguf_factory import write_tiny_llama

    src = write_tiny_llama(tmp_path / "q41.gguf", qtype=gguf.GGMLQuantizationType.Q4_1)
    out = _quantize(src, tmp_path / "f16.gguf", QuantOptions(PRESETS["F16"]))
    reader = gguf.GGUFReader(src)
    with GGUFFile(out) as f:
        for t in reader.tensors:
            ref = gguf.quants.dequantize(t.data, t.tensor_type)
            info = f.tensor_infos[t.name]
            got = f.raw(t.name).view(
                torch.float16 if info.qtype == QuantType.F16 else torch.float32
            )
            np.testing.assert_array_equal(
                got.float().numpy().reshape(ref.shape),
                ref.astype(np.float16 if info.qtype == QuantType.F16 else np.float32),
            )
