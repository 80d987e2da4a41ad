"""`llamapy convert` and HF folders of nomic-bert and jina-bert-v2 against llama.cpp's own
converter (convert_hf_to_gguf.py from the pinned llama-cpp-python sdist): the same tensors,
byte for byte, and the same hyperparameter keys. With that, a jina-bert-v2 folder holding
the weights of a committed reference model must embed as llama.cpp did (CI needs no
llama.cpp for that part).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from encoder_factory import (
    POOLING_CASES,
    REF_SEEDS,
    SPECS,
    make_nomic_folder,
    nomic_with_original_config,
    save_jina_folder,
)

from llamapy.api import LLM
from llamapy.convert.hf_to_gguf import hf_source
from llamapy.convert.quantize_model import quantize_model
from llamapy.formats.gguf_file import GGUFFile
from llamapy.quant.presets import QuantOptions, parse_preset

sys.path.insert(0, str(Path(__file__).parent.parent / "models"))
from tiny_models import convert_to_gguf  # noqa: E402

REFS = Path(__file__).parent / "data" / "encoders"
JINA = ("jina-bert-v2", "jina-bert-v2-code")
_IGNORED = ("general.", "tokenizer.")


def _convert(folder: Path, out: Path, *, with_vocab: bool) -> Path:
    source = hf_source(folder, with_vocab=with_vocab)
    try:
        quantize_model(source, out, QuantOptions(parse_preset("F32")))
    finally:
        source.close()
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """nomic-bert as nomic-ai's checkpoints are (custom-code config), and the jina variants
    with the seeds of the committed references."""
    pytest.importorskip("transformers", reason="transformers (dev extra) builds the folders")
    if not hasattr(pytest.importorskip("transformers"), "NomicBertModel"):
        pytest.skip("this transformers has no native NomicBertModel (5.x has)")
    root = tmp_path_factory.mktemp("enc_convert")
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"nomic seed: {seed}")
    make_nomic_folder(root / "nomic-saved", seed)
    out = {"nomic-bert": nomic_with_original_config(root / "nomic-saved", root / "nomic-bert")}
    for name in JINA:
        out[name] = save_jina_folder(root / name, SPECS[name], REF_SEEDS[name])
    return out


@pytest.fixture(scope="module")
def llama_cpp_files(folders, tmp_path_factory) -> dict[str, Path]:
    from testdata import llama_cpp_sdist

    try:
        vendor = llama_cpp_sdist()
    except RuntimeError as e:
        pytest.skip(f"llama.cpp's converter is not available: {e}")
    root = tmp_path_factory.mktemp("enc_convert_ref")
    files = {name: root / f"{name}.gguf" for name in folders}
    inputs = dict(folders)
    # transformers 5 has a native nomic_bert whose AutoConfig would hand llama.cpp's
    # converter its defaults (12 layers, ...) in place of the custom-code keys; with an
    # unknown model_type it reads config.json itself, as before transformers 5.
    inputs["nomic-bert"] = _copy_with_unknown_model_type(folders["nomic-bert"], root / "nomic")
    convert_to_gguf(vendor, [(inputs[name], files[name]) for name in folders])
    return files


def _copy_with_unknown_model_type(folder: Path, out: Path) -> Path:
    import shutil

    shutil.copytree(folder, out)
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    cfg["model_type"] = "nomic_bert_custom_code"
    (out / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return out


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else value


@pytest.mark.parametrize("name", ["nomic-bert", *JINA])
def test_same_tensors_and_keys_as_llama_cpp_converter(name, folders, llama_cpp_files, tmp_path):
    ours = _convert(folders[name], tmp_path / f"{name}.gguf", with_vocab=False)
    with GGUFFile(ours) as a, GGUFFile(llama_cpp_files[name]) as b:
        assert a.metadata["general.architecture"] == b.metadata["general.architecture"]
        assert sorted(a.tensor_infos) == sorted(b.tensor_infos)
        for tensor, info in b.tensor_infos.items():
            mine = a.tensor_infos[tensor]
            assert (mine.qtype, mine.shape) == (info.qtype, info.shape), tensor
            assert torch.equal(a.raw(tensor), b.raw(tensor)), f"{tensor} differs"
        for key, value in b.metadata.items():
            if key.startswith(_IGNORED):
                continue
            assert key in a.metadata, f"llamapy lacks {key}"
            assert _plain(a.metadata[key]) == pytest.approx(_plain(value)), key


@pytest.mark.parametrize("name", JINA)
def test_jina_folder_embeds_as_committed_llama_cpp_outputs(name, folders, tmp_path) -> None:
    """The folder (HF names, read by llamapy) and its `llamapy convert` output both give
    llama.cpp's embeddings of the reference GGUF with the same weights."""
    meta = json.loads((REFS / "encoder-refs.json").read_text(encoding="utf-8"))
    with np.load(REFS / "encoder-refs.npz") as z:
        arrays = {k: z[k] for k in z.files}
    texts = meta["texts"]
    for model in (folders[name], _convert(folders[name], tmp_path / "j.gguf", with_vocab=True)):
        llm = LLM(model)
        assert llm.config.arch == "jina-bert-v2"
        ids = [llm.embedder.text_input(t).token_ids for t in texts]
        assert ids == meta["models"][name]["token_ids"]
        for pooling, normalize in POOLING_CASES:
            ours = llm.embed(texts, pooling=pooling, normalize=normalize)
            ref = torch.from_numpy(arrays[f"{name}/{pooling}/{'l2' if normalize else 'raw'}"])
            cos = torch.nn.functional.cosine_similarity(ours.double(), ref.double(), dim=-1)
            assert cos.min() >= 0.99999, (model, pooling, normalize, cos.min().item())
