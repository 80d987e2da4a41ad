"""The HTTP server: OpenAI-compatible and llama.cpp-native endpoints over AsyncLLMEngine."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamapy.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from llamapy.engine.llm_engine import RequestOutput
from llamapy.errors import ContextLengthError, LlamapyError
from llamapy.sampling.params import SamplingParams
from llamapy.server.protocol import (
    ApplyTemplateRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    NativeCompletionRequest,
    SamplingFields,
    TokenizeRequest,
)
from llamapy.server.tools import (
    ToolCallStreamer,
    ToolError,
    ToolPlan,
    parse_tool_calls,
    special_token_lookup,
)
from llamapy.server.tools import finish_reason as tool_finish_reason
from llamapy.tokenizer import TemplateError

logger = logging.getLogger(__name__)

# Routes answered without an API key (as llama-server: health checks and the web page).
PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/", "/index.html"})
STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    model: str | None = None
    alias: str | None = None
    n_ctx: int | None = None
    max_num_seqs: int = 4
    api_key: str | None = None
    chat_template: str | None = None
    enable_metrics: bool = False
    max_queued: int = 64
    n_threads: int | None = None
    device: str = "cpu"
    quantize: str | None = None  # quantize the weights as they load (Q4_0, Q4_K_M, ...)
    enforce_eager: bool = False  # no compiled CPU decode step, no CUDA graphs
    async_scheduling: bool | None = None  # None: on for CUDA (see EngineConfig)
    kv_cache_dtype: str | None = None  # f32 / f16 / bf16 (-ctk); None: the device's default
    embedding: bool = False  # embeddings only (server/embeddings.py); no generation engine
    reranking: bool = False  # reranking (and embeddings) only: pooling rank
    pooling: str | None = None


@dataclass
class ServerState:
    config: ServerConfig
    llm: Any = None
    engine: AsyncLLMEngine | None = None
    embedder: Any = None  # AsyncEmbedder in --embedding / --reranking mode
    load_error: str | None = None
    started: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return self.engine is not None or self.embedder is not None

    @property
    def model_name(self) -> str:
        if self.config.alias:
            return self.config.alias
        if self.llm is None:
            return "llamapy"
        return self.llm.resolved.alias or self.llm.resolved.path.name


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


def _error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code or status}}
    return JSONResponse(body, status_code=status)


def load_model(state: ServerState) -> None:
    """Load the model (in a thread, so /health answers 503 meanwhile)."""
    from llamapy.api import LLM

    cfg = state.config
    try:
        llm = LLM(
            cfg.model,
            n_ctx=cfg.n_ctx,
            max_num_seqs=cfg.max_num_seqs,
            n_threads=cfg.n_threads,
            chat_template=cfg.chat_template,
            device=cfg.device,
            quantize=cfg.quantize,
            enforce_eager=cfg.enforce_eager,
            async_scheduling=cfg.async_scheduling,
            kv_cache_dtype=cfg.kv_cache_dtype,
            embedding=cfg.embedding or cfg.reranking or None,
            pooling="rank" if cfg.reranking else cfg.pooling,
        )
    except Exception as e:  # any failure must show in /health, not leave it loading forever
        state.load_error = str(e)
        logger.error("model load failed: %s", e)
        return
    state.llm = llm
    if llm.engine is None:  # an encoder, or --embedding / --reranking
        from llamapy.embedding.async_engine import AsyncEmbedder

        state.embedder = AsyncEmbedder(llm.embedder, max_queued=cfg.max_queued)
    else:
        state.engine = AsyncLLMEngine(llm.engine, max_queued=cfg.max_queued)
    logger.info("model %s ready", state.model_name)


class ModelServer(uvicorn.Server):
    """uvicorn's server for `llamapy serve`: it loads the model (in a thread, as
    create_app's `load`) once the socket is bound, so a port in use fails at once, and stops
    when the model cannot load, as llama-server exits."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        threading.Thread(target=self._load, daemon=True).start()

    def _load(self) -> None:
        load_model(self.state)
        if self.state.load_error is not None:
            self.should_exit = True


def create_app(config: ServerConfig, *, load: bool = True) -> FastAPI:
    state = ServerState(config)
    app = FastAPI(title="llamapy", version="0.1.0")
    app.state.llamapy = state
    if load:
        threading.Thread(target=load_model, args=(state,), daemon=True).start()
    _install_error_handlers(app)
    _install_auth(app, state)
    _install_routes(app, state)
    from llamapy.server.embeddings import router as embeddings_router

    app.include_router(embeddings_router)
    return app


# -- errors and auth --------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return _error_response(
                400, f"the body is not valid JSON: {reason}".rstrip(": "), "invalid_request_error"
            )
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if not loc:
            msg = "the body must be a JSON object"
            return _error_response(400, msg, "invalid_request_error")
        msg = f"{loc}: {first.get('msg', 'invalid value')}"
        return _error_response(400, msg, "invalid_request_error", loc)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error_response(500, f"internal error: {e!r}", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(e.status_code, str(e.detail), kind)


def _install_auth(app: FastAPI, state: ServerState) -> None:
    key = state.config.api_key
    if not key:
        return

    @app.middleware("http")
    async def _check_key(request: Request, call_next):
        if request.url.path in PUBLIC_PATHS or request.method == "OPTIONS":
            return await call_next(request)
        header = request.headers.get("authorization", "")
        given = (
            header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
        )
        if given != key:
            return _error_response(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)


# -- helpers ----------------------------------------------------------------------------------


def _require_ready(state: ServerState) -> Any:
    if state.load_error:
        raise APIError(503, f"model failed to load: {state.load_error}", "unavailable_error")
    if not state.ready:
        raise APIError(503, "Loading model", "unavailable_error")
    return state.llm


def _require_engine(state: ServerState) -> Any:
    """_require_ready, and a generation engine (none in --embedding / --reranking mode)."""
    llm = _require_ready(state)
    if state.engine is None:
        raise APIError(
            501,
            "This server only embeds and reranks. Start it without --embedding / --reranking",
            "not_supported_error",
        )
    return llm


def _check_model(state: ServerState, model: str | None) -> None:
    """One model is served; a request naming another is a 404 (as OpenAI's API)."""
    if model and model != state.model_name:
        raise APIError(
            404,
            f"model {model!r} not found; this server has {state.model_name!r}",
            "not_found_error",
            "model",
            "model_not_found",
        )


def _params(build, *args) -> SamplingParams:
    try:
        return build(*args)
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(str(e))) from None


def _message_dicts(messages) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=True)
        if isinstance(d.get("content"), list):  # OpenAI content parts: keep the text ones
            d["content"] = "".join(
                p.get("text", "") for p in d["content"] if p.get("type") == "text"
            )
        out.append(d)
    return out


def _chat_prompt(llm, messages, tools=None, plan: ToolPlan | None = None) -> list[int]:
    try:
        dicts = _message_dicts(messages)
        if plan is not None:  # tools, calls and results as the template can show them
            dicts, tools = plan.render_inputs(dicts)
        kwargs = {"tools": tools} if tools else {}
        return llm.apply_chat_template(dicts, **kwargs)
    except ToolError as e:
        raise APIError(400, str(e), param=e.param) from None
    except TemplateError as e:
        raise APIError(400, f"chat template error: {e}") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _prompt_ids(llm, prompt) -> list[int]:
    if isinstance(prompt, str):
        return llm.tokenize(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list):  # llama.cpp: mixed strings and ids
        ids: list[int] = []
        for part in prompt:
            ids.extend([part] if isinstance(part, int) else llm.tokenize(part, add_special=not ids))
        return ids
    raise APIError(400, "prompt must be a string or a list of token ids", param="prompt")


def _param_of(message: str) -> str | None:
    """The request field a validation message starts with ("top_p must be ..."), if any."""
    word = re.match(r"\w+", message)
    name = word.group(0) if word else ""
    return name if name in SamplingFields.model_fields or name == "max_tokens" else None


def _engine_errors(e: Exception) -> APIError:
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), "unavailable_error")
    if isinstance(e, EngineDeadError):
        return APIError(500, str(e), "server_error")
    return APIError(400, str(e), param=_param_of(str(e)))


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i of n: its own seed (seed + i) so the choices differ but stay reproducible."""
    if i == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + i) % 2**32)


def _usage(outs_per_choice: list[list[RequestOutput]]) -> dict[str, Any]:
    last = [outs[-1] for outs in outs_per_choice if outs]
    prompt = last[0].num_prompt_tokens if last else 0
    completion = sum(o.num_output_tokens for o in last)
    cached = max((o.num_cached_tokens for o in last), default=0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _sse_error(e: Exception) -> str:
    """An error after the stream began (status 200 is sent): an event in OpenAI's shape."""
    err = _engine_errors(e)
    return _sse({"error": {"message": err.message, "type": err.type, "code": err.status}})


# -- routes -----------------------------------------------------------------------------------


def _install_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> JSONResponse:
        if state.load_error:
            return _error_response(
                503, f"model failed to load: {state.load_error}", "unavailable_error"
            )
        if not state.ready:
            return _error_response(503, "Loading model", "unavailable_error")
        if state.engine is not None and state.engine.error is not None:
            return _error_response(500, f"engine failed: {state.engine.error!r}", "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> dict[str, Any]:
        llm = _require_ready(state)
        meta = {
            "n_ctx": llm.n_ctx,
            "n_ctx_train": llm.config.context_length,
            "n_vocab": llm.config.vocab_size,
            "architecture": llm.config.arch,
        }
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": int(state.started),
                    "owned_by": "llamapy",
                    "meta": meta,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        llm = _require_engine(state)
        _check_model(state, body.model)
        prompts = body.prompt
        if isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list)):
            if len(prompts) != 1:
                raise APIError(400, "one prompt per request is supported", param="prompt")
            prompts = prompts[0]
        ids = _prompt_ids(llm, prompts)
        best_of = body.best_of or body.n
        if best_of < body.n:
            raise APIError(400, f"best_of ({best_of}) must be >= n ({body.n})", param="best_of")
        if body.stream and best_of > body.n:
            raise APIError(400, "best_of cannot be used with stream", param="best_of")
        # Ranking by cumulative log-probability needs the chosen tokens' log-probs.
        n_probs = max(body.logprobs or 0, 1 if best_of > body.n else 0)
        params = _params(body.sampling_params, body.max_tokens, n_probs)
        cid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return await _stream(
                state,
                ids,
                params,
                body.n,
                cid,
                chat=False,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
            )
        results = await _run_choices(state, request, ids, params, best_of, cid)
        usage = _usage([outs for _, outs in results])  # best_of: every candidate is billed
        if best_of > body.n:
            results = sorted(results, key=_cumulative_logprob, reverse=True)[: body.n]
        choices = [
            {
                "index": i,
                "text": text,
                "logprobs": _completion_logprobs(llm, outs) if body.logprobs else None,
                "finish_reason": outs[-1].finish_reason if outs else "length",
            }
            for i, (text, outs) in enumerate(results)
        ]
        return {
            "id": cid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.model_name,
            "choices": choices,
            "usage": usage,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        llm = _require_engine(state)
        _check_model(state, body.model)
        plan = _tool_plan(llm, body)
        ids = _chat_prompt(llm, body.messages, body.tools, plan)
        n_probs = (body.top_logprobs or 0) if body.logprobs else 0
        if body.logprobs and not n_probs:
            n_probs = 1
        params = _params(body.sampling_params, body.max_new_tokens, n_probs)
        params = _tool_constraint(llm, params, plan)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return await _stream(
                state,
                ids,
                params,
                body.n,
                cid,
                chat=True,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
                tools=plan,
            )
        results = await _run_choices(state, request, ids, params, body.n, cid)
        choices = [
            {
                "index": i,
                **_chat_message(text, outs, plan),
                "logprobs": _chat_logprobs(llm, outs, body.top_logprobs or 0)
                if body.logprobs
                else None,
            }
            for i, (text, outs) in enumerate(results)
        ]
        return {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": state.model_name,
            "choices": choices,
            "usage": _usage([outs for _, outs in results]),
        }

    @app.post("/completion")
    @app.post("/completions")
    async def native_completion(body: NativeCompletionRequest, request: Request):
        llm = _require_engine(state)
        ids = _prompt_ids(llm, body.prompt)
        max_tokens = None if body.n_predict < 0 else body.n_predict
        params = _params(body.sampling_params, max_tokens, body.n_probs)
        rid = f"native-{uuid.uuid4().hex}"
        if body.stream:
            (stream,) = await _add_choices(state.engine, ids, params, 1, rid)
            return StreamingResponse(
                _native_stream(state, stream, f"{rid}-0", params), media_type="text/event-stream"
            )
        ((text, outs),) = await _run_choices(state, request, ids, params, 1, rid)
        last = outs[-1] if outs else None
        return _with_native_probs(llm, outs, params) | {
            "content": text,
            "tokens": [t for o in outs for t in o.token_ids],
            "stop": True,
            "model": state.model_name,
            "stop_type": "limit" if last and last.finish_reason == "length" else "eos",
            "tokens_predicted": last.num_output_tokens if last else 0,
            "tokens_evaluated": last.num_prompt_tokens if last else len(ids),
            "tokens_cached": last.num_cached_tokens if last else 0,
            "truncated": False,
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        llm = _require_ready(state)
        ids = llm.tokenize(
            body.content, add_special=body.add_special, parse_special=body.parse_special
        )
        if body.with_pieces:
            tok = llm.tokenizer
            return {
                "tokens": [
                    {"id": i, "piece": tok.token_bytes(i).decode("utf-8", "replace")} for i in ids
                ]
            }
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        llm = _require_ready(state)
        vocab = llm.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens"
            )
        return {"content": llm.detokenize(body.tokens)}

    @app.post("/apply-template")
    async def apply_template(body: ApplyTemplateRequest):
        llm = _require_ready(state)
        if llm.chat_template is None:
            raise APIError(
                400, "the model has no chat template; start the server with --chat-template"
            )
        try:
            return {"prompt": llm.chat_template.render(_message_dicts(body.messages))}
        except TemplateError as e:
            raise APIError(400, f"chat template error: {e}") from None

    @app.get("/props")
    async def props():
        llm = _require_ready(state)
        return {
            "model_path": str(llm.resolved.path),
            "n_ctx": llm.n_ctx,
            "total_slots": state.config.max_num_seqs,
            "chat_template": llm.chat_template.source if llm.chat_template else None,
            "build_info": "llamapy 0.1.0",
            "default_generation_settings": {"n_ctx": llm.n_ctx, "params": _default_params()},
        }

    @app.get("/slots")
    async def slots():
        _require_engine(state)
        return await state.engine.call(_slots_view)

    @app.get("/metrics")
    async def metrics():
        if not state.config.enable_metrics:
            raise APIError(
                501, "metrics are disabled; start the server with --metrics", "not_supported_error"
            )
        _require_engine(state)
        from llamapy.server.metrics import render_metrics

        return Response(await render_metrics(state), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    @app.get("/index.html", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def _default_params() -> dict[str, Any]:
    d = SamplingParams()
    return {
        "temperature": d.temperature,
        "top_k": d.top_k,
        "top_p": d.top_p,
        "min_p": d.min_p,
        "typical_p": d.typical_p,
        "repeat_penalty": d.repeat_penalty,
        "repeat_last_n": d.repeat_last_n,
        "presence_penalty": d.presence_penalty,
        "frequency_penalty": d.frequency_penalty,
        **{
            name: getattr(d, name)
            for name in (
                "min_keep",
                "dry_multiplier",
                "dry_base",
                "dry_allowed_length",
                "dry_penalty_last_n",
                "xtc_probability",
                "xtc_threshold",
                "top_n_sigma",
                "dynatemp_range",
                "dynatemp_exponent",
                "mirostat",
                "mirostat_tau",
                "mirostat_eta",
                "n_probs",
                "post_sampling_probs",
            )
        },
        "dry_sequence_breakers": list(d.dry_sequence_breakers),
        "samplers": [s.value for s in d.samplers],
    }


def _slots_view(engine) -> list[dict[str, Any]]:
    """One entry per slot (as llama-server), the running sequences first."""
    running = engine.scheduler.running
    view = []
    for i in range(max(engine.config.max_num_seqs, len(running))):
        seq = running[i] if i < len(running) else None
        view.append(
            {
                "id": i,
                "is_processing": seq is not None,
                "n_ctx": engine.config.max_model_len,
                "n_prompt_tokens": seq.num_prompt_tokens if seq else 0,
                "n_decoded": seq.num_output_tokens if seq else 0,
                "n_cached": seq.num_cached_tokens if seq else 0,
            }
        )
    return view


async def _add_choices(engine: AsyncLLMEngine, ids, params, n: int, cid: str) -> list:
    """Add the n choices of one request; their output iterators. Choice 0 goes first, the
    others once its prompt is computed, so they take its prompt blocks from the prefix cache
    instead of computing them again. Bad input is an APIError before anything streams."""
    n_ctx = engine.engine.config.max_model_len
    if params.max_tokens is not None and len(ids) + params.max_tokens > n_ctx:
        # As vLLM and OpenAI: an explicit max_tokens that cannot fit is the client's mistake.
        raise APIError(
            400,
            f"this model's context holds {n_ctx} tokens, but {len(ids) + params.max_tokens} "
            f"were requested ({len(ids)} in the prompt, {params.max_tokens} to generate)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    streams = []
    try:
        for i in range(n):
            if i == 1:
                await engine.first_output(f"{cid}-0")
            streams.append(await engine.add_request(ids, _seeded(params, i), f"{cid}-{i}"))
    except (LlamapyError, ValueError) as e:
        for i in range(n):
            engine.abort(f"{cid}-{i}")
        raise _engine_errors(e) from None
    return streams


async def _run_choices(state: ServerState, request: Request, ids, params, n: int, cid: str):
    """[(text, outputs)] per choice; a client that hangs up aborts the generation."""
    streams = await _add_choices(state.engine, ids, params, n, cid)

    async def collect(stream) -> tuple[str, list[RequestOutput]]:
        outs = [o async for o in stream]
        return "".join(o.text for o in outs), outs

    work = asyncio.ensure_future(asyncio.gather(*(collect(s) for s in streams)))
    watch = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            for i in range(n):
                state.engine.abort(f"{cid}-{i}")
    try:
        return await work
    except asyncio.CancelledError:  # the client left: nobody reads this answer
        raise APIError(499, "client closed the request") from None
    except (LlamapyError, ValueError) as e:
        raise _engine_errors(e) from None


def _cumulative_logprob(result: tuple[str, list[RequestOutput]]) -> float:
    """OpenAI's best_of criterion: the candidate's total log-probability."""
    return sum(s.logprob for o in result[1] for s in o.logprobs if s.logprob is not None)


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)


async def _stream(
    state, ids, params, n, cid, *, chat: bool, include_usage: bool, tools: ToolPlan | None = None
):
    """Add the requests now (so bad input is a 400, not a broken stream), then stream."""
    streams = await _add_choices(state.engine, ids, params, n, cid)
    rids = [f"{cid}-{i}" for i in range(n)]
    return StreamingResponse(
        _sse_events(state, streams, rids, cid, chat=chat, include_usage=include_usage, tools=tools),
        media_type="text/event-stream",
    )


async def _sse_events(
    state, streams, rids, cid, *, chat: bool, include_usage: bool, tools: ToolPlan | None = None
) -> AsyncIterator[str]:
    created, model = int(time.time()), state.model_name
    obj = "chat.completion.chunk" if chat else "text_completion"
    queue: asyncio.Queue = asyncio.Queue()
    finals: list[list[RequestOutput]] = [[] for _ in streams]

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": cid, "object": obj, "created": created, "model": model}
        return _sse({**body, "choices": choices, **extra})

    async def pump(i: int, stream) -> None:
        try:
            async for out in stream:
                finals[i].append(out)
                await queue.put((i, out))
        except (LlamapyError, ValueError) as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        if chat:
            for i in range(len(streams)):
                role = {"role": "assistant", "content": ""}
                yield chunk([{"index": i, "delta": role, "finish_reason": None}])
        open_streams = len(streams)
        streamers: list[ToolCallStreamer] = []
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                yield _sse_error(item)
            elif chat and tools is not None and tools.parses:
                streamers = streamers or [ToolCallStreamer(tools) for _ in streams]
                for choice in _tool_stream_choices(streamers[i], i, item):
                    yield chunk([choice])
            else:
                choice: dict[str, Any] = {"index": i, "finish_reason": item.finish_reason}
                if chat:
                    choice["delta"] = {"content": item.text} if item.text else {}
                else:
                    choice["text"] = item.text
                yield chunk([choice])
        if include_usage:
            yield chunk([], usage=_usage(finals))
        yield "data: [DONE]\n\n"
    finally:  # also when the client hung up: stop generating
        for t in tasks:
            t.cancel()
        for rid in rids:
            state.engine.abort(rid)


async def _native_stream(state, stream, rid, params=None) -> AsyncIterator[str]:
    try:
        async for out in stream:
            data = {"content": out.text, "tokens": out.token_ids, "stop": out.finished}
            if params is not None:
                data |= _with_native_probs(state.llm, [out], params)
            if out.finished:
                data.update(
                    {
                        "stop_type": "limit" if out.finish_reason == "length" else "eos",
                        "tokens_predicted": out.num_output_tokens,
                        "tokens_evaluated": out.num_prompt_tokens,
                        "tokens_cached": out.num_cached_tokens,
                    }
                )
            yield _sse(data)
    except (LlamapyError, ValueError) as e:
        yield _sse_error(e)
    finally:
        state.engine.abort(rid)


def _with_native_probs(llm, outs: list[RequestOutput], params: SamplingParams) -> dict[str, Any]:
    """llama-server's completion_probabilities when n_probs > 0: per token its id, text,
    bytes and logprob, and the top n_probs; "prob" / "top_probs" (probabilities of the
    final distribution) with post_sampling_probs."""
    samples = [s for o in outs for s in o.logprobs]
    if not params.n_probs or not samples:
        return {}
    post = params.post_sampling_probs
    key, top_key = ("prob", "top_probs") if post else ("logprob", "top_logprobs")
    tok = llm.tokenizer

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = tok.token_bytes(token_id)
        value = math.exp(logprob) if post else max(logprob, -1e30)  # JSON has no -inf
        return {"id": token_id, "token": raw.decode("utf-8", "replace"), "bytes": list(raw),
                key: value}  # fmt: skip

    return {
        "completion_probabilities": [
            entry(s.token_id, s.logprob) | {top_key: [entry(t, lp) for t, lp in s.top_logprobs]}
            for s in samples
        ]
    }


def _completion_logprobs(llm, outs: list[RequestOutput]) -> dict[str, Any]:
    samples = [s for o in outs for s in o.logprobs]
    tok = llm.tokenizer
    piece = lambda t: tok.token_bytes(t).decode("utf-8", "replace")  # noqa: E731
    return {
        "tokens": [piece(s.token_id) for s in samples],
        "token_logprobs": [s.logprob for s in samples],
        "top_logprobs": [{piece(t): lp for t, lp in s.top_logprobs} for s in samples],
    }


def _chat_logprobs(llm, outs: list[RequestOutput], top: int) -> dict[str, Any]:
    samples = [s for o in outs for s in o.logprobs]
    tok = llm.tokenizer
    piece = lambda t: tok.token_bytes(t).decode("utf-8", "replace")  # noqa: E731
    return {
        "content": [
            {
                "token": piece(s.token_id),
                "logprob": s.logprob,
                "bytes": list(tok.token_bytes(s.token_id)),
                "top_logprobs": [
                    {"token": piece(t), "logprob": lp, "bytes": list(tok.token_bytes(t))}
                    for t, lp in s.top_logprobs[:top]
                ],
            }
            for s in samples
        ]
    }


# -- tool calls (llamapy.server.tools) ----------------------------------------------------------


def _tool_plan(llm, body: ChatCompletionRequest) -> ToolPlan | None:
    if llm.chat_template is None:
        return None  # _chat_prompt answers that the model has no template
    try:
        return ToolPlan.build(
            body.tools,
            body.tool_choice,
            llm.chat_template,
            body.parallel_tool_calls,
            _message_dicts(body.messages),
        )
    except ToolError as e:
        raise APIError(400, str(e), param=e.param) from None


def _tool_constraint(llm, params: SamplingParams, plan: ToolPlan | None) -> SamplingParams:
    """The request's params with the grammar its tool_choice needs (if any)."""
    extra = plan.constraint(special_token_lookup(llm.tokenizer)) if plan else {}
    if not extra:
        return params
    if params.constraint is not None:
        raise APIError(
            400,
            "a response_format or grammar cannot be combined with tools here (this model's "
            "tool calls are constrained); send tool_choice 'none' or leave the grammar out",
            param="tool_choice",
        )
    try:
        return replace(params, **extra)
    except ValueError as e:
        raise APIError(400, f"the tools' parameters cannot be used: {e}", param="tools") from None


def _chat_message(text: str, outs: list[RequestOutput], plan: ToolPlan | None) -> dict[str, Any]:
    """A non-streamed choice's message and finish reason, tool calls parsed out."""
    reason = outs[-1].finish_reason if outs else "length"
    if plan is None or not plan.parses:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": reason}
    parsed = parse_tool_calls(text, plan.format, plan.names, plan.new_id)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    return {
        "message": message,
        "finish_reason": tool_finish_reason(reason, bool(parsed.tool_calls)),
    }


def _tool_stream_choices(streamer: ToolCallStreamer, i: int, out: RequestOutput) -> list[dict]:
    """Stream choices for one engine output: content and tool-call deltas, then the finish."""
    deltas = streamer.feed(out.text)
    if out.finished:
        deltas += streamer.finish()
    choices = [{"index": i, "delta": d, "finish_reason": None} for d in deltas]
    if out.finished:
        reason = tool_finish_reason(out.finish_reason, streamer.has_calls)
        choices.append({"index": i, "delta": {}, "finish_reason": reason})
    return choices
