"""nomic-bert and jina-bert-v2 encoders: GGUF files against llama.cpp (live where
llama-cpp-python is installed, else its committed outputs), nomic-bert Hugging Face folders
(transformers' and nomic-ai's layouts) against transformers' NomicBertModel, and
`llamapy convert` of those folders.

Every comparison embeds a batch of texts of varied length in one forward pass (the
padding-free varlen path) with mean and cls pooling, L2-normalised and not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from embed_corpus import varied_sentences
from encoder_factory import (
    POOLING_CASES,
    SPECS,
    llama_cpp_embed,
    llama_cpp_rank,
    make_nomic_folder,
    nomic_with_native_names,
    nomic_with_original_config,
    weights_digest,
    write_encoder_gguf,
)

from llamapy.api import LLM
from llamapy.cli.main import main
from llamapy.embedding.batch import EncoderInput
from llamapy.errors import ModelFormatError

try:
    import llama_cpp  # noqa: F401

    HAS_LLAMA_CPP = True
except ImportError:
    HAS_LLAMA_CPP = False

needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python (llama.cpp itself, the oracle) is not installed"
)
REFS = Path(__file__).parent / "data" / "encoders"
MIN_COSINE = 0.99999  # F32 weights; llama.cpp's GELU reads an fp16 table (jina: ~1e-4 abs)


def _seed() -> int:
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"encoder seed: {seed}")
    return seed


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _texts(rng: np.random.Generator, llm: LLM, n: int = 14, max_tokens: int = 400) -> list[str]:
    """Varied texts that fit the tiny models' context (the tiny vocabulary spells most
    words letter by letter), lengths from 2 tokens up."""
    texts = [t for t in varied_sentences(rng, 3 * n) if len(llm.tokenize(t)) <= max_tokens]
    return texts[:n]


def _check_all_poolings(llm: LLM, texts: list[str], reference) -> None:
    """llamapy's embeddings (one batch) against `reference(pooling, normalize)`, text by text."""
    for pooling, normalize in POOLING_CASES:
        ours = llm.embed(texts, pooling=pooling, normalize=normalize)
        ref = reference(pooling, normalize)
        cos = _cosines(ours, ref)
        assert cos.min() >= MIN_COSINE, (pooling, normalize, cos.min().item())
        scale = ref.abs().max().item()
        assert (ours - ref).abs().max().item() < 1e-3 * max(1.0, scale), (pooling, normalize)


# -- GGUF against llama.cpp -------------------------------------------------------------------


@needs_llama_cpp
@pytest.mark.parametrize("name", list(SPECS))
def test_gguf_equals_llama_cpp(name: str, tmp_path: Path, rng) -> None:
    spec = SPECS[name]
    path = write_encoder_gguf(tmp_path / f"{name}.gguf", spec, _seed())
    llm = LLM(path)
    assert (llm.config.arch, llm.config.causal, llm.engine) == (spec.arch, False, None)
    texts = _texts(rng, llm)
    ids = [llm.embedder.text_input(t).token_ids for t in texts]
    assert len(set(map(len, ids))) > 5  # varied lengths in the one batch
    assert len({t for x in ids for t in x}) > 40  # real tokens, not [UNK] after [UNK]
    refs = {}
    for pooling, normalize in POOLING_CASES:
        refs[pooling, normalize], ref_ids = llama_cpp_embed(path, texts, pooling, normalize)
        assert ids == ref_ids
    _check_all_poolings(llm, texts, lambda p, n: refs[p, n])


def _refs() -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((REFS / "encoder-refs.json").read_text(encoding="utf-8"))
    with np.load(REFS / "encoder-refs.npz") as z:
        return meta, {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", list(SPECS))
def test_gguf_equals_committed_llama_cpp_outputs(name: str, tmp_path: Path) -> None:
    """The same check without llama.cpp: its outputs for seeded models, stored by
    scripts/make_encoder_refs.py."""
    meta, arrays = _refs()
    entry = meta["models"][name]
    spec, seed = SPECS[name], entry["seed"]
    assert weights_digest(spec, seed) == entry["digest"], (
        "the rebuilt model differs from the one llama.cpp ran (numpy's generator or the "
        "factory changed): run scripts/make_encoder_refs.py"
    )
    llm = LLM(write_encoder_gguf(tmp_path / f"{name}.gguf", spec, seed))
    texts = meta["texts"]
    assert [llm.embedder.text_input(t).token_ids for t in texts] == entry["token_ids"]

    def reference(pooling: str, normalize: bool) -> torch.Tensor:
        return torch.from_numpy(arrays[f"{name}/{pooling}/{'l2' if normalize else 'raw'}"])

    _check_all_poolings(llm, texts, reference)
    if spec.rank_head:
        ours = _rank_scores(llm, entry["token_ids"])
        ref = torch.from_numpy(arrays[f"{name}/rank"])
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def _rank_scores(llm: LLM, token_ids: list[list[int]]) -> torch.Tensor:
    """The rank head's score of each token sequence, all in one batch (no token types:
    llama.cpp feeds type 0 throughout)."""
    scores = llm.embedder.encode([EncoderInput(ids) for ids in token_ids], "rank")
    return torch.stack(scores)[:, 0]


@needs_llama_cpp
def test_rank_head_equals_llama_cpp(tmp_path: Path, rng) -> None:
    """jina-reranker-v1's head (`cls`: one row, tanh, no `cls.output`) as llama.cpp's rank
    pooling computes it."""
    path = write_encoder_gguf(tmp_path / "reranker.gguf", SPECS["jina-reranker"], _seed())
    llm = LLM(path)
    assert llm.embedder.pooling == "rank" and llm.embedder.is_reranker
    ids = [llm.embedder.text_input(t).token_ids for t in _texts(rng, llm)]
    ref = llama_cpp_rank(path, ids)
    assert ref.std() > 0.01  # the scores tell the texts apart
    torch.testing.assert_close(_rank_scores(llm, ids), ref, atol=1e-4, rtol=0)


def test_alibi_bias_in_query_chunks(tmp_path: Path, monkeypatch) -> None:
    """Long sequences build the ALiBi bias a block of queries at a time: forced to a few
    rows per block, jina-bert-v2 still gives llama.cpp's outputs."""
    from llamapy.models import bert

    monkeypatch.setattr(bert, "_ALIBI_BIAS_ELEMENTS", 600)  # 4 heads: 150 // L rows a block
    meta, arrays = _refs()
    name = "jina-bert-v2"
    path = write_encoder_gguf(tmp_path / "j.gguf", SPECS[name], meta["models"][name]["seed"])
    ours = LLM(path).embed(meta["texts"], pooling="mean", normalize=False)
    assert _cosines(ours, torch.from_numpy(arrays[f"{name}/mean/raw"])).min() >= MIN_COSINE


def test_alibi_and_rope_matter(tmp_path: Path) -> None:
    """The committed references tell the position schemes apart: without ALiBi (jina) or
    without rope (nomic) llamapy would miss them by far more than the tolerance."""
    meta, arrays = _refs()
    texts = meta["texts"]
    for name in ("jina-bert-v2", "nomic-bert"):
        path = write_encoder_gguf(
            tmp_path / f"{name}.gguf", SPECS[name], meta["models"][name]["seed"]
        )
        llm = LLM(path)
        model = llm.embedder.model
        model.alibi, model.rotary = None, None  # plain bidirectional attention, no positions
        ours = llm.embed(texts, pooling="mean", normalize=False)
        ref = torch.from_numpy(arrays[f"{name}/mean/raw"])
        assert _cosines(ours, ref).min() < 0.9999


# -- Hugging Face folders against transformers ------------------------------------------------


@pytest.fixture(scope="module")
def nomic_folders(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, Path]]:
    """A random transformers NomicBertModel saved three ways: as save_pretrained writes it
    (nomic-ai's tensor names, transformers' config), with transformers' in-memory names, and
    with nomic-ai's custom-code config too."""
    pytest.importorskip("transformers", reason="transformers (dev extra) is the oracle")
    if not hasattr(pytest.importorskip("transformers"), "NomicBertModel"):
        pytest.skip("this transformers has no native NomicBertModel (5.x has)")
    root = tmp_path_factory.mktemp("nomic")
    model = make_nomic_folder(root / "saved", _seed())
    folders = {
        "saved": root / "saved",
        "native-names": nomic_with_native_names(model, root / "saved", root / "native"),
        "original-config": nomic_with_original_config(root / "saved", root / "original"),
    }
    return model, folders


def _transformers_pooled(model, folder: Path, texts: list[str]):
    """transformers' NomicBertModel on each text alone (no padding), pooled like llama.cpp."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = [tok(t)["input_ids"] for t in texts]
    with torch.no_grad():
        hidden = [model(torch.tensor([x])).last_hidden_state[0] for x in ids]

    def reference(pooling: str, normalize: bool) -> torch.Tensor:
        pooled = torch.stack([h.mean(0) if pooling == "mean" else h[0] for h in hidden])
        return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    return reference, ids


@pytest.mark.parametrize("layout", ["saved", "native-names", "original-config"])
def test_nomic_hf_folder_equals_transformers(nomic_folders, layout: str, rng) -> None:
    model, folders = nomic_folders
    llm = LLM(folders[layout])
    assert llm.config.arch == "nomic-bert"
    assert llm.config.rope_theta == model.config.rope_parameters["rope_theta"]
    texts = _texts(rng, llm)
    reference, ids = _transformers_pooled(model, folders["saved"], texts)
    assert [llm.embedder.text_input(t).token_ids for t in texts] == ids
    assert len({t for x in ids for t in x}) > 40  # real tokens, not [UNK] after [UNK]
    _check_all_poolings(llm, texts, reference)


def test_nomic_convert_equals_transformers_and_llama_cpp(nomic_folders, tmp_path, rng) -> None:
    """`llamapy convert` of each layout: llamapy and (where installed) llama.cpp run the GGUF
    as transformers runs the folder."""
    from llamapy.convert.hf_to_gguf import hf_source
    from llamapy.convert.quantize_model import quantize_model
    from llamapy.quant.presets import QuantOptions, parse_preset

    model, folders = nomic_folders
    texts = None
    for layout, folder in folders.items():
        out = tmp_path / f"{layout}.gguf"
        source = hf_source(folder, with_vocab=True)
        try:
            quantize_model(source, out, QuantOptions(parse_preset("F32")))
        finally:
            source.close()
        llm = LLM(out)
        assert llm.config.arch == "nomic-bert"
        texts = texts or _texts(rng, llm, n=10)
        reference, ids = _transformers_pooled(model, folders["saved"], texts)
        assert [llm.embedder.text_input(t).token_ids for t in texts] == ids
        _check_all_poolings(llm, texts, reference)
        if HAS_LLAMA_CPP:
            for pooling, normalize in (("mean", False), ("cls", True)):
                got, got_ids = llama_cpp_embed(out, texts, pooling, normalize)
                assert got_ids == ids
                assert _cosines(got, reference(pooling, normalize)).min() >= MIN_COSINE


# -- the command line and bad files -----------------------------------------------------------


@pytest.mark.parametrize("name", ["nomic-bert", "jina-bert-v2"])
def test_embed_cli_on_tiny_gguf(name: str, tmp_path: Path, capsys) -> None:
    path = write_encoder_gguf(tmp_path / f"{name}.gguf", SPECS[name], _seed())
    texts = ["hello world", "the value of a string"]
    capsys.readouterr()
    assert main(["embed", "-m", str(path), "--json", *texts]) == 0
    out = json.loads(capsys.readouterr().out)
    got = torch.tensor([d["embedding"] for d in out["data"]])
    want = LLM(path).embed(texts)
    assert got.shape == (2, SPECS[name].hidden)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


_BROKEN = [
    ("nomic-bert", {"drop": ("blk.1.ffn_gate.weight",)}, "blk.1.ffn_gate.weight"),
    ("nomic-bert", {"drop": ("token_embd_norm.bias",)}, "token_embd_norm.bias"),
    ("nomic-bert", {"replace": {"blk.0.attn_qkv.weight": torch.zeros(64, 32)}}, "attn_qkv"),
    ("jina-bert-v2", {"drop": ("token_types.weight",)}, "token_types.weight"),
    ("jina-bert-v2", {"drop": ("blk.0.attn_output.bias",)}, "blk.0.attn_output.bias"),
    ("jina-bert-v2", {"replace": {"blk.1.ffn_up.weight": torch.zeros(72, 32)}}, "ffn_up"),
    ("jina-bert-v2", {"replace": {"blk.0.ffn_down.weight": torch.zeros(32, 96)}}, "ffn_down"),
    ("jina-bert-v2", {"metadata_drop": ("jina-bert-v2.block_count",)}, "block_count"),
    ("nomic-bert", {"metadata_drop": ("nomic-bert.embedding_length",)}, "embedding_length"),
]


@pytest.mark.parametrize(("name", "damage", "named"), _BROKEN)
def test_broken_gguf_is_a_clean_error(name, damage, named, tmp_path, capsys) -> None:
    path = write_encoder_gguf(tmp_path / "broken.gguf", SPECS[name], 7, **damage)
    with pytest.raises(ModelFormatError, match=named.replace(".", r"\.")):
        LLM(path)
    capsys.readouterr()
    assert main(["embed", "-m", str(path), "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_unsupported_nomic_options_are_named(nomic_folders, tmp_path) -> None:
    from llamapy.errors import UnsupportedError

    _, folders = nomic_folders
    folder = nomic_with_original_config(folders["saved"], tmp_path / "interleaved")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg["rotary_emb_interleaved"] = True
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(UnsupportedError, match="rotary_emb_interleaved"):
        LLM(folder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_equals_cpu(name: str, tmp_path: Path, rng) -> None:
    """On CUDA: nomic-bert through the paged Triton kernels (rope applied before), jina-bert-v2
    through SDPA with its ALiBi bias; both as the CPU computes them."""
    path = write_encoder_gguf(tmp_path / f"{name}.gguf", SPECS[name], _seed())
    cpu = LLM(path)
    gpu = LLM(path, device="cuda")
    texts = _texts(rng, cpu)
    cos = _cosines(gpu.embed(texts).cpu(), cpu.embed(texts))
    assert cos.min() >= 0.9999, cos.min().item()  # fp16 K/V in the paged cache
