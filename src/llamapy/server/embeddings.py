"""Embedding and reranking routes (`llamapy serve --embedding` / `--reranking`).

OpenAI's POST /v1/embeddings (input: a string, strings, token ids or lists of them;
encoding_format float / base64; dimensions for Matryoshka models); llama.cpp's /embedding
and /embeddings (field `content` or `input`; every token's vector with pooling none);
POST /v1/rerank with the aliases /rerank, /reranking, /v1/reranking (query, documents,
top_n, return_documents; the response of llama.cpp / Jina / Cohere; TEI's `texts` and
`return_text` answer TEI's list).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from llamapy.embedding import EncoderInput, rank
from llamapy.errors import LlamapyError
from llamapy.server.app import APIError, ServerState, _check_model, _engine_errors, _require_ready

router = APIRouter()

_INPUT_SHAPES = "a string, a list of token ids, or a list of strings and token-id lists"


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    # a string, token ids, or a list of either (checked by _inputs, with a clear message)
    input: Any = None
    content: Any = None  # llama.cpp's /embedding
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # llama.cpp: -1 none, 0 max-abs, 2 L2, p > 0 p-norm
    embd_normalize: int | None = Field(default=None, ge=-1)
    truncate: bool = False  # cut inputs longer than the model takes (else 400)


class RerankDocument(BaseModel):
    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    query: str
    documents: list[str | RerankDocument] | None = None
    texts: list[str] | None = None  # TEI
    model: str | None = None
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False
    return_text: bool = False  # TEI
    truncate: bool = False


def _state(request: Request) -> ServerState:
    return request.app.state.llamapy


def _embedder(state: ServerState, *, rerank: bool = False):
    _require_ready(state)
    embedder = getattr(state, "embedder", None)
    if embedder is None:
        raise APIError(
            501,
            "This server does not support embeddings. Start it with --embedding",
            "not_supported_error",
        )
    if rerank and embedder.engine.pooling != "rank":
        raise APIError(
            501,
            "This server does not support reranking. Start it with --reranking",
            "not_supported_error",
        )
    return embedder


def _inputs(engine, value: Any, truncate: bool) -> list[EncoderInput]:
    """The request's texts or token-id lists as encoder inputs (llama.cpp's shapes: one
    string, one id list, or a list of strings and id lists)."""
    if value is None:
        raise APIError(400, '"input" or "content" must be provided', param="input")
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(_is_id(t) for t in value)
    ):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(v, str) or (isinstance(v, list) and all(_is_id(t) for t in v)) for v in value
    ):
        raise APIError(400, f'"input" must be {_INPUT_SHAPES}', param="input")
    if not value:
        raise APIError(400, '"input" must not be empty', param="input")
    try:
        return [
            engine.text_input(v, truncate=truncate) if isinstance(v, str) else engine.ids_input(v)
            for v in value
        ]
    except (LlamapyError, ValueError) as e:
        raise _input_error(e) from None


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _input_error(e: Exception) -> APIError:
    err = _engine_errors(e)
    err.param = "input"
    return err


async def _encode(embedder, inputs: list[EncoderInput], pooling: str | None = None):
    try:
        return await embedder.encode(inputs, pooling)
    except (LlamapyError, ValueError) as e:
        raise _engine_errors(e) from None


def _vector_json(v: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI's
        return base64.b64encode(v.to(torch.float32).contiguous().numpy().tobytes()).decode()
    return v.tolist()


@router.post("/v1/embeddings")
async def openai_embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    state = _state(request)
    embedder = _embedder(state)
    engine = embedder.engine
    _check_model(state, body.model)
    if engine.pooling == "none":
        raise APIError(
            400, "Pooling type 'none' is not OAI compatible. Please use a different pooling type"
        )
    if body.dimensions is not None:
        try:
            engine.check_dimensions(body.dimensions)
        except ValueError as e:
            raise APIError(400, str(e), param="dimensions") from None
    inputs = _inputs(engine, body.input if body.input is not None else body.content, body.truncate)
    vectors = await _encode(embedder, inputs)
    if body.dimensions is not None:
        vectors = [v[: body.dimensions] for v in vectors]
    vectors = engine.normalized(vectors, body.embd_normalize, engine.pooling)
    n_tokens = sum(len(x) for x in inputs)
    data = [
        {"object": "embedding", "index": i, "embedding": _vector_json(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": state.model_name,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }


@router.post("/embedding")
@router.post("/embeddings")
async def native_embeddings(body: EmbeddingRequest, request: Request) -> list[dict[str, Any]]:
    """llama.cpp's non-OpenAI form: [{"index", "embedding": [vector]}], or every token's
    vector with pooling none."""
    state = _state(request)
    embedder = _embedder(state)
    engine = embedder.engine
    value = body.content if body.content is not None else body.input
    inputs = _inputs(engine, value, body.truncate)
    vectors = await _encode(embedder, inputs)
    vectors = engine.normalized(vectors, body.embd_normalize, engine.pooling)
    return [
        {"index": i, "embedding": v.tolist() if v.dim() == 2 else [v.tolist()]}
        for i, v in enumerate(vectors)
    ]


@router.post("/v1/rerank")
@router.post("/v1/reranking")
@router.post("/rerank")
@router.post("/reranking")
async def rerank(body: RerankRequest, request: Request) -> Any:
    state = _state(request)
    embedder = _embedder(state, rerank=True)
    engine = embedder.engine
    _check_model(state, body.model)
    is_tei = body.texts is not None and body.documents is None
    raw = body.documents if body.documents is not None else body.texts
    docs = [d if isinstance(d, str) else d.text for d in raw or []]
    if not docs:
        raise APIError(400, '"documents" must be a non-empty string array', param="documents")
    try:
        inputs = [engine.pair_input(body.query, d, truncate=body.truncate) for d in docs]
    except (LlamapyError, ValueError) as e:
        err = _engine_errors(e)
        err.param = "documents"
        raise err from None
    scores = [float(s[0]) for s in await _encode(embedder, inputs, "rank")]
    ranked = rank(scores, docs, body.top_n)
    if is_tei:
        return [
            {
                "index": r.index,
                "score": r.score,
                **({"text": r.document} if body.return_text else {}),
            }
            for r in ranked
        ]
    results = []
    for r in ranked:
        item: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
        if body.return_documents:
            item["document"] = {"text": r.document}
        results.append(item)
    n_tokens = sum(len(x) for x in inputs)
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": state.model_name,
        "object": "list",
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        "results": results,
    }
