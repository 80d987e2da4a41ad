"""`llamapy serve --embedding` and `--reranking` on 127.0.0.1: OpenAI's client gets
sentence-transformers' vectors for minilm-l6; llama.cpp's /embedding, /v1/rerank and its
aliases answer in llama.cpp's / Jina's / Cohere's / TEI's shapes; bad input is a 400."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from live_server import Server, serve

pytestmark = pytest.mark.models

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar.",
    "Python's generators are lazy iterators.",
    "東京タワーは日本の電波塔です。",
    "",
]


@pytest.fixture(scope="module")
def st_model(minilm_path: Path):
    st = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers (dev extra) is the oracle"
    )
    return st.SentenceTransformer(str(minilm_path), device="cpu")


@pytest.fixture(scope="module")
def embed_server(minilm_path: Path, tmp_path_factory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("embed_server")
    with serve(minilm_path, "--embedding", log_dir=logs) as s:
        yield s


@pytest.fixture(scope="module")
def client(embed_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{embed_server.url}/v1", api_key="unused", timeout=120)


def _close(got, ref, tol: float = 1e-4) -> None:
    got, ref = torch.as_tensor(np.asarray(got)), torch.as_tensor(np.asarray(ref))
    assert got.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)
    assert cos.min() >= 0.9999 and (got - ref).abs().max() < tol


def test_openai_client_gets_sentence_transformers_vectors(client, embed_server, st_model):
    ref = st_model.encode(TEXTS)
    model = embed_server.model_name()
    # the client asks for base64 unless told otherwise, and decodes it itself
    for fmt in ({}, {"encoding_format": "float"}):
        res = client.embeddings.create(model=model, input=TEXTS, **fmt)
        assert [d.index for d in res.data] == list(range(len(TEXTS)))
        _close([d.embedding for d in res.data], ref)
    b64 = client.embeddings.create(model=model, input=TEXTS, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in b64.data]
    _close(decoded, ref)
    n_tokens = sum(len(st_model.tokenizer(t).input_ids) for t in TEXTS)
    assert res.usage.prompt_tokens == res.usage.total_tokens == n_tokens
    one = client.embeddings.create(model=model, input=TEXTS[0])
    _close([one.data[0].embedding], ref[:1])


def test_token_id_inputs_embed_like_their_text(client, embed_server, st_model):
    ids = [st_model.tokenizer(t).input_ids for t in TEXTS[:3]]
    res = client.embeddings.create(model=embed_server.model_name(), input=ids)
    _close([d.embedding for d in res.data], st_model.encode(TEXTS[:3]))
    single = client.embeddings.create(model=embed_server.model_name(), input=ids[1])
    _close([single.data[0].embedding], st_model.encode(TEXTS[1:2]))


def test_llama_cpp_native_embedding_routes(embed_server, st_model):
    ref = st_model.encode(TEXTS[:2])
    with embed_server.client() as http:
        for path in ("/embedding", "/embeddings"):
            body = http.post(path, json={"content": TEXTS[:2]}).json()
            assert [b["index"] for b in body] == [0, 1]
            _close([b["embedding"][0] for b in body], ref)
        raw = http.post("/embedding", json={"content": TEXTS[0], "embd_normalize": -1}).json()
        assert abs(np.linalg.norm(raw[0]["embedding"][0]) - 1.0) > 1e-2  # not normalised


def test_concurrent_requests_share_passes_and_stay_exact(embed_server, st_model):
    texts = [f"{t} (request {i})" for i, t in enumerate(TEXTS[:4] * 3)]
    ref = st_model.encode(texts)

    def one(text: str) -> list[float]:
        body = {"input": text, "encoding_format": "float"}
        r = httpx.post(f"{embed_server.url}/v1/embeddings", json=body, timeout=120)
        return r.json()["data"][0]["embedding"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, texts))
    _close(got, ref)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/embeddings", {"input": "x", "dimensions": 128}, 400, "dimensions"),
        ("/v1/embeddings", {"input": []}, 400, "input"),
        ("/v1/embeddings", {}, 400, "input"),
        ("/v1/embeddings", {"input": [99999999]}, 400, "input"),
        ("/v1/embeddings", {"input": [[1, 2], [-5]]}, 400, "input"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
        ("/v1/embeddings", {"input": 5}, 400, "input"),
        ("/v1/embeddings", {"input": "x", "model": "gpt-4"}, 404, "model"),
        ("/v1/embeddings", {"input": "word " * 400}, 400, "input"),
        ("/embedding", {"content": [[]]}, 400, "input"),
        ("/v1/embeddings", {"input": "x", "embd_normalize": -5}, 400, "embd_normalize"),
        ("/embedding", {"content": "x", "embd_normalize": -2}, 400, "embd_normalize"),
        ("/v1/rerank", {"query": "q", "documents": ["d"]}, 501, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 501, None),
        ("/v1/completions", {"prompt": "hi"}, 501, None),
    ],
)
def test_bad_requests_are_answered_in_openai_error_shape(embed_server, path, body, status, param):
    with embed_server.client() as http:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param


def test_too_long_input_names_the_limit_unless_truncated(embed_server, st_model):
    long = "word " * 400
    with embed_server.client() as http:
        r = http.post("/v1/embeddings", json={"input": long})
        assert r.json()["error"]["code"] == "context_length_exceeded"
        ok = http.post("/v1/embeddings", json={"input": long, "truncate": True})
    _close([ok.json()["data"][0]["embedding"]], st_model.encode([long]))  # ST cuts at 256


def test_embedding_server_still_tokenizes_and_reports_health(embed_server):
    with embed_server.client() as http:
        assert http.get("/health").json() == {"status": "ok"}
        ids = http.post("/tokenize", json={"content": "hello world"}).json()["tokens"]
        assert ids == [7592, 2088]  # llama-server adds no special tokens by default
        assert http.get("/v1/models").json()["data"][0]["meta"]["architecture"] == "bert"


# -- reranking --------------------------------------------------------------------------------

DOCS = [
    "Paris is the capital of France.",
    "Bananas are yellow.",
    "The Eiffel Tower is in Paris.",
    "Python is a programming language.",
]
QUERY = "Where is the Eiffel Tower?"


@pytest.fixture(scope="module")
def cross_encoder(minilm_path: Path, tmp_path_factory):
    """(folder, transformers model, tokenizer): a random BertForSequenceClassification."""
    tf = pytest.importorskip("transformers", reason="transformers (dev extra) is the oracle")
    folder = tmp_path_factory.mktemp("cross_encoder")
    cfg = tf.BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=1,
    )
    model = tf.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path / name, folder / name)
    return folder, model, tf.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def rerank_server(cross_encoder, tmp_path_factory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("rerank_server")
    with serve(cross_encoder[0], "--reranking", log_dir=logs) as s:
        yield s


def test_rerank_scores_equal_transformers_in_every_shape(rerank_server, cross_encoder):
    _, model, tok = cross_encoder
    enc = tok([QUERY] * len(DOCS), DOCS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[:, 0]
    order = torch.argsort(ref, descending=True).tolist()
    with rerank_server.client() as http:
        for path in ("/v1/rerank", "/rerank", "/reranking", "/v1/reranking"):
            body = http.post(path, json={"query": QUERY, "documents": DOCS}).json()
            assert [r["index"] for r in body["results"]] == order
            got = torch.tensor([r["relevance_score"] for r in body["results"]])
            assert (got - ref[order]).abs().max() < 1e-4
            assert body["usage"]["prompt_tokens"] == int(enc.attention_mask.sum())
        cohere = http.post(
            "/v1/rerank",
            json={
                "query": QUERY,
                "documents": [{"text": d} for d in DOCS],
                "top_n": 2,
                "return_documents": True,
            },
        ).json()["results"]
        assert [r["index"] for r in cohere] == order[:2]
        assert [r["document"]["text"] for r in cohere] == [DOCS[i] for i in order[:2]]
        tei = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
        assert [(r["index"], r["text"]) for r in tei.json()] == [(i, DOCS[i]) for i in order]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": QUERY, "documents": []}, "documents"),
        ({"query": QUERY}, "documents"),
        ({"documents": DOCS}, "query"),
        ({"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
        ({"query": QUERY, "documents": [5]}, "documents.0.str"),
        ({"query": "word " * 600, "documents": DOCS}, "documents"),
    ],
)
def test_bad_rerank_requests_are_400(rerank_server, body, param):
    with rerank_server.client() as http:
        r = http.post("/v1/rerank", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
