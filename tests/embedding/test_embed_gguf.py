"""BERT from GGUF: minilm-l6 written as llama.cpp's converter writes a BERT (its tensor names,
`bert.*` hyperparameters, the WordPiece vocabulary in "phantom space" form), embedded by
llamapy and by llama.cpp itself (llama-cpp-python)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from embed_corpus import varied_sentences

from llamapy.formats import open_model_file
from llamapy.formats.gguf_writer import write_gguf
from llamapy.quant.types import QuantType

pytestmark = pytest.mark.models

_LLAMA_POOLING_MEAN = 1
_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_CONTROL = 1, 3


def write_bert_gguf(folder: Path, out: Path, qtype: QuantType | None = None) -> Path:
    """As convert_hf_to_gguf.py's BertModel: encoder tensors (the pooler dropped), weights of
    the blocks as `qtype` (None: F32)."""
    f = open_model_file(folder)
    cfg = f.config
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = tj["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {a["content"] for a in tj["added_tokens"] if a.get("special")}
    types = [_TOKEN_TYPE_CONTROL if t in special else _TOKEN_TYPE_NORMAL for t in tokens]

    def phantom(tok: str, kind: int) -> str:  # BertModel.set_vocab's phantom space
        if kind == _TOKEN_TYPE_CONTROL:
            return tok
        return tok[2:] if tok.startswith("##") else "\u2581" + tok

    metadata = {
        "general.name": "all-MiniLM-L6-v2",
        "bert.context_length": cfg.context_length,
        "bert.embedding_length": cfg.hidden_size,
        "bert.feed_forward_length": cfg.ffn_size,
        "bert.block_count": cfg.num_layers,
        "bert.attention.head_count": cfg.num_heads,
        "bert.attention.layer_norm_epsilon": cfg.norm_eps,
        "bert.attention.causal": False,
        "bert.pooling_type": _LLAMA_POOLING_MEAN,
        "tokenizer.ggml.token_type_count": 2,
        "tokenizer.ggml.model": "bert",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [phantom(t, k) for t, k in zip(tokens, types, strict=True)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": vocab["[UNK]"],
        "tokenizer.ggml.seperator_token_id": vocab["[SEP]"],
        "tokenizer.ggml.padding_token_id": vocab["[PAD]"],
        "tokenizer.ggml.cls_token_id": vocab["[CLS]"],
        "tokenizer.ggml.mask_token_id": vocab["[MASK]"],
    }
    tensors = []
    for name in f.tensor_infos:
        if not name.startswith(("token_", "position_", "blk.")):
            continue  # the pooler: llama.cpp's converter drops it
        t = f.tensor(name).dequantize(torch.float32)
        quantize = qtype is not None and name.startswith("blk.") and t.dim() == 2
        tensors.append((name, t, qtype if quantize else None))
    return write_gguf(out, "bert", metadata, tensors)


@pytest.fixture(scope="module")
def minilm_gguf(minilm_path: Path, tmp_path_factory) -> Path:
    return write_bert_gguf(minilm_path, tmp_path_factory.mktemp("bert") / "minilm-f32.gguf")


def _llama_cpp_embed(path: Path, texts: list[str]) -> tuple[torch.Tensor, list[list[int]]]:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed"
    )
    llm = llama_cpp.Llama(
        model_path=str(path), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, verbose=False
    )
    ids = [llm.tokenize(t.encode("utf-8")) for t in texts]
    return torch.tensor(llm.embed(texts, normalize=True)), ids


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_gguf_config_and_tokens_follow_llama_cpp(minilm_gguf, minilm_llm):
    from llamapy.api import LLM

    llm = LLM(minilm_gguf)
    cfg = llm.config
    assert (cfg.arch, cfg.pooling, cfg.causal, cfg.norm_type) == ("bert", "mean", False, "layer")
    assert llm.embedder.pooling == "mean" and llm.engine is None
    text = "Hello, World! naïve café 東京"
    assert llm.embedder.text_input(text).token_ids == minilm_llm.embedder.text_input(text).token_ids


def test_gguf_bert_equals_llama_cpp(minilm_gguf, rng):
    from llamapy.api import LLM

    texts = [t for t in varied_sentences(rng, 24) if len(t.split()) < 150][:16]
    ref, ref_ids = _llama_cpp_embed(minilm_gguf, texts)
    llm = LLM(minilm_gguf)
    assert [llm.embedder.text_input(t).token_ids for t in texts] == ref_ids
    ours = llm.embed(texts)
    # llama.cpp's GELU reads an fp16 table: differences ~1e-4, far below any real error
    assert _cosines(ours, ref).min() >= 0.99999
    assert (ours - ref).abs().max() < 1e-3


def test_gguf_and_hf_folder_of_one_model_agree(minilm_gguf, minilm_llm, rng):
    """GELU is the tanh form for GGUF (as ggml) and erf for the folder: rounding-level apart."""
    from llamapy.api import LLM

    texts = varied_sentences(rng, 10)
    # the GGUF does not carry sentence-transformers' max_seq_length (256): give it as n_ctx
    ours = LLM(minilm_gguf, n_ctx=256).embed(texts, truncate=True)
    assert _cosines(ours, minilm_llm.embed(texts, truncate=True)).min() >= 0.9999


def test_q8_0_gguf_bert_stays_close_to_llama_cpp(minilm_path, minilm_gguf, tmp_path, rng):
    """Both read the same Q8_0 blocks, but llama.cpp also rounds every matmul's activations to
    8 bits: llamapy must sit no farther from llama.cpp on the Q8_0 file than llama.cpp's own
    Q8_0 run sits from its float32 run (weight + activation rounding), text by text."""
    from llamapy.api import LLM

    path = write_bert_gguf(minilm_path, tmp_path / "minilm-q8_0.gguf", QuantType.Q8_0)
    texts = [t for t in varied_sentences(rng, 12) if len(t.split()) < 150][:8]
    ref, _ = _llama_cpp_embed(path, texts)
    ref_f32, _ = _llama_cpp_embed(minilm_gguf, texts)
    ours_gap = 1 - _cosines(LLM(path).embed(texts), ref)
    own_gap = 1 - _cosines(ref, ref_f32)
    assert (ours_gap <= 2 * own_gap + 1e-6).all(), (ours_gap.tolist(), own_gap.tolist())
