"""BERT embeddings and cross-encoder reranking on CUDA (the paged Triton attention kernels
with causal=False) against the CPU path, on random-weight HF folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)]


def _folder(tmp_path: Path, kind: str, seed: int) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,  # head dim 16: the Triton kernels' smallest
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=1,
    )
    model = (BertModel if kind == "embed" else BertForSequenceClassification)(cfg).eval()
    folder = tmp_path / kind
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    ).save_pretrained(folder)
    return folder


def _texts(rng) -> list[str]:
    return [
        " ".join(f"w{int(t)}" for t in rng.integers(0, 200, size=int(n)))
        for n in rng.integers(2, 100, size=6)
    ]


def test_bert_embeddings_cuda_equal_cpu(tmp_path, rng):
    from llamapy.api import LLM

    folder = _folder(tmp_path, "embed", int(rng.integers(2**31)))
    texts = _texts(rng)
    cpu, gpu = LLM(str(folder)), LLM(str(folder), device="cuda")
    a = torch.as_tensor(cpu.embed(texts))
    b = torch.as_tensor(gpu.embed(texts)).cpu()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() >= 0.9999, cos  # fp16 K/V in the paged cache


def test_bert_rerank_cuda_equals_cpu(tmp_path, rng):
    from llamapy.api import LLM

    folder = _folder(tmp_path, "rerank", int(rng.integers(2**31)))
    docs = _texts(rng)
    cpu, gpu = LLM(str(folder)), LLM(str(folder), device="cuda")
    a, b = cpu.rerank("w1 w2 w3", docs), gpu.rerank("w1 w2 w3", docs)
    scores_a = {r.index: r.score for r in a}
    scores_b = {r.index: r.score for r in b}
    assert scores_a.keys() == scores_b.keys()
    assert max(abs(scores_a[i] - scores_b[i]) for i in scores_a) < 1e-3
