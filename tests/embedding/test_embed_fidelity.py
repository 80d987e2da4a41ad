"""minilm-l6 (all-MiniLM-L6-v2, a sentence-transformers folder) embedded by llamapy equals
sentence-transformers' own output for the same folder: per text, and as retrieval rankings
over real text (CPython's documentation, see embed_corpus.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from embed_corpus import passages, varied_sentences

pytestmark = pytest.mark.models


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_200_varied_sentences_equal_sentence_transformers(minilm_llm, st_minilm, rng):
    texts = varied_sentences(rng, 200)
    ours = minilm_llm.embed(texts, truncate=True)  # ST cuts at max_seq_length (256) too
    ref = torch.from_numpy(st_minilm.encode(texts, batch_size=32, convert_to_numpy=True))
    assert ours.shape == ref.shape == (200, 384)
    cos = _cosines(ours, ref)
    worst = int(cos.argmin())
    assert cos.min() >= 0.9999, f"text {texts[worst]!r}: cosine {cos[worst]:.6f}"
    # both L2-normalised (the folder's Normalize module), to float32 rounding
    assert torch.allclose(ours.norm(dim=-1), torch.ones(200), atol=1e-5)
    assert (ours - ref).abs().max() < 1e-4


def test_pooling_none_cls_last_equal_the_token_embeddings(minilm_llm, st_minilm, rng):
    texts = varied_sentences(rng, 12)[:6]
    tokens = st_minilm.encode(texts, output_value="token_embeddings", convert_to_tensor=True)
    ours = minilm_llm.embed(texts, pooling="none", truncate=True)
    for mine, ref in zip(ours, tokens, strict=True):
        assert mine.shape == ref.shape
        assert (mine - ref).abs().max() < 1e-4
    for pooling, row in (("cls", 0), ("last", -1)):
        pooled = minilm_llm.embed(texts, pooling=pooling, normalize=False, truncate=True)
        expected = torch.stack([t[row] for t in tokens])
        assert (pooled - expected).abs().max() < 1e-4


def test_unnormalized_mean_equals_the_pooling_module(minilm_llm, st_minilm, rng):
    texts = varied_sentences(rng, 20)[:8]
    feats = st_minilm.encode(texts, output_value=None, convert_to_tensor=True)
    ref = torch.stack([f["sentence_embedding"] for f in feats])  # after Normalize
    raw = minilm_llm.embed(texts, normalize=False, truncate=True)
    assert _cosines(raw, ref).min() >= 0.9999
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(texts)), atol=1e-3)


def _top10(queries: torch.Tensor, docs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    scores = (queries.double() @ docs.double().T).numpy()
    return np.argsort(-scores, axis=1, kind="stable")[:, :10], scores


@pytest.mark.slow
def test_retrieval_top10_equals_sentence_transformers(minilm_llm, st_minilm, rng):
    """50 queries over 500 passages of CPython's documentation: the same top-10 lists."""
    pool = [p for p in passages() if len(p.split()) <= 120]  # keeps the test quick
    docs = [pool[i] for i in rng.choice(len(pool), 500, replace=False)]
    # a query: the first 6 to 14 words of a passage (it is in the corpus; its neighbours
    # and their order are what is compared)
    queries = [
        " ".join(docs[i].split()[: int(rng.integers(6, 15))])
        for i in rng.choice(500, 50, replace=False)
    ]
    ours_q = minilm_llm.embed(queries, truncate=True)
    ours_d = minilm_llm.embed(docs, truncate=True)
    ref_q = torch.from_numpy(st_minilm.encode(queries, batch_size=32))
    ref_d = torch.from_numpy(st_minilm.encode(docs, batch_size=32))
    ours_top, _ = _top10(ours_q, ours_d)
    ref_top, ref_scores = _top10(ref_q, ref_d)
    for q in range(50):
        if np.array_equal(ours_top[q], ref_top[q]):
            continue
        # only a float-rounding tie may swap two documents: their oracle scores agree
        for a, b in zip(ours_top[q], ref_top[q], strict=True):
            gap = abs(ref_scores[q, a] - ref_scores[q, b])
            assert gap < 1e-6, f"query {queries[q]!r}: rank differs ({a} vs {b}, gap {gap:.2e})"
