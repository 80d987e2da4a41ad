"""Cross-encoder reranking: a random BertForSequenceClassification made with transformers
(minilm-l6's WordPiece vocabulary), scored by llamapy and by transformers itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from embed_corpus import passages

pytestmark = pytest.mark.models

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


@pytest.fixture
def cross_encoder(tmp_path: Path, rng, minilm_path: Path):
    """(folder, transformers model, transformers tokenizer) of a fresh random cross-encoder."""
    tf = pytest.importorskip("transformers", reason="transformers (dev extra) is the oracle")
    cfg = tf.BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=1,
    )
    torch.manual_seed(int(rng.integers(2**31)))
    model = tf.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # weights large enough that every part moves the score
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    model.save_pretrained(tmp_path)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path / name, tmp_path / name)
    return tmp_path, model, tf.AutoTokenizer.from_pretrained(tmp_path)


def _reference_scores(model, tok, query: str, docs: list[str], **kw) -> torch.Tensor:
    enc = tok([query] * len(docs), docs, padding=True, return_tensors="pt", **kw)
    with torch.no_grad():
        return model(**enc).logits[:, 0]


def test_cross_encoder_scores_equal_transformers(cross_encoder, rng):
    from llamapy.api import LLM

    folder, model, tok = cross_encoder
    pool = passages()
    # a query of at most 24 tokens: 8 words of a dense code passage can take 100+ tokens,
    # and then no pair fits the model's 128 (a random pick did so once in CI)
    queries = [" ".join(p.split()[:8]) for p in pool]
    queries = [q for q in queries if len(tok(q)["input_ids"]) <= 24]
    query = queries[int(rng.integers(len(queries)))]
    # short pairs that fit the model's 128 tokens (some passages are dense code: 15 words can
    # take 100+ tokens); the truncation test covers the long ones
    candidates = [" ".join(pool[i].split()[:15]) for i in rng.choice(len(pool), 60, replace=False)]
    docs = [d for d in candidates if len(tok(query, d)["input_ids"]) <= 128][:12]
    assert len(docs) >= 8
    llm = LLM(folder)
    assert llm.embedder.pooling == "rank" and llm.embedder.is_reranker
    results = llm.rerank(query, docs)
    ref = _reference_scores(model, tok, query, docs)
    got = torch.tensor([r.score for r in sorted(results, key=lambda r: r.index)])
    assert (got - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    assert [r.index for r in results] == torch.argsort(ref, descending=True, stable=True).tolist()
    assert [r.document for r in results] == [docs[r.index] for r in results]
    assert [r.index for r in llm.rerank(query, docs, top_n=3)] == [r.index for r in results[:3]]


def test_long_pairs_truncate_longest_first_as_transformers(cross_encoder, rng):
    from llamapy.api import LLM
    from llamapy.errors import ContextLengthError

    folder, model, tok = cross_encoder
    pool = passages()
    long_docs = [" ".join(rng.choice(pool, 6)) for _ in range(3)]  # past 128 tokens
    query = " ".join(rng.choice(pool, 2))  # long too: both sides get cut
    llm = LLM(folder)
    with pytest.raises(ContextLengthError, match="at most 128"):
        llm.rerank(query, long_docs)
    results = llm.rerank(query, long_docs, truncate=True)
    ref = _reference_scores(
        model, tok, query, long_docs, truncation="longest_first", max_length=128
    )
    got = torch.tensor([r.score for r in sorted(results, key=lambda r: r.index)])
    assert (got - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


def test_an_embedding_model_cannot_rerank(minilm_llm):
    from llamapy.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="no classification head"):
        minilm_llm.rerank("query", ["a document"])


def test_matryoshka_dimensions_come_from_the_config(tmp_path, minilm_path, minilm_llm):
    tf = pytest.importorskip("transformers", reason="transformers (dev extra) makes the model")
    cfg = tf.BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    cfg.matryoshka_dimensions = [16, 32]
    tf.BertModel(cfg).save_pretrained(tmp_path)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path / name, tmp_path / name)
    from llamapy.api import LLM

    engine = LLM(tmp_path).embedder
    engine.check_dimensions(32)
    for bad in (48, 0, 128):
        with pytest.raises(ValueError, match="dimensions must be one of 16, 32"):
            engine.check_dimensions(bad)
    with pytest.raises(ValueError, match="not Matryoshka"):
        minilm_llm.embedder.check_dimensions(128)
