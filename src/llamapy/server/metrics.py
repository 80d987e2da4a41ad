"""Prometheus exposition of the server's counters, with llama.cpp's metric names."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

# llama-server exposes no *_created series; neither do we.
disable_created_metrics()


def _engine_view(engine) -> dict[str, Any]:
    bm = engine.block_manager
    return {
        "kv_usage": bm.usage(),
        "kv_free_blocks": bm.num_free_blocks,
        "kv_blocks": bm.num_blocks,
        "kv_tokens": (bm.num_blocks - bm.num_free_blocks) * bm.block_size,
        "running": len(engine.scheduler.running),
        "waiting": len(engine.scheduler.waiting),
        "prefix_queries": bm.num_prefix_queries,
        "prefix_hits": bm.num_prefix_hits,
        "preemptions": engine.scheduler.num_preemptions,
    }


async def render_metrics(state) -> bytes:
    """A fresh registry per scrape: the values are read from the engine, not mirrored."""
    stats = state.engine.stats
    view = await state.engine.call(_engine_view)
    reg = CollectorRegistry()

    def counter(name: str, doc: str, value: float) -> None:
        Counter(name, doc, registry=reg).inc(value)

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, registry=reg).set(value)

    counter("llamacpp:prompt_tokens", "Number of prompt tokens processed.", stats.prompt_tokens)
    counter(
        "llamacpp:tokens_predicted",
        "Number of generation tokens processed.",
        stats.generated_tokens,
    )
    counter("llamacpp:n_decode", "Number of engine steps.", stats.steps)
    counter("llamacpp:requests", "Requests received.", stats.num_requests)
    gauge("llamacpp:requests_processing", "Number of requests processing.", view["running"])
    gauge("llamacpp:requests_deferred", "Number of requests deferred.", view["waiting"])
    gauge(
        "llamacpp:kv_cache_usage_ratio",
        "KV-cache usage. 1 means 100 percent usage.",
        view["kv_usage"],
    )
    gauge("llamacpp:kv_cache_tokens", "KV-cache tokens (in used blocks).", view["kv_tokens"])
    gauge("llamapy:kv_free_blocks", "KV-cache blocks no sequence holds.", view["kv_free_blocks"])
    gauge("llamapy:kv_blocks", "KV-cache blocks in all.", view["kv_blocks"])
    counter(
        "llamapy:prefix_cache_queries_tokens",
        "Prompt tokens looked up in the prefix cache.",
        view["prefix_queries"],
    )
    counter(
        "llamapy:prefix_cache_hits_tokens",
        "Prompt tokens found in the prefix cache.",
        view["prefix_hits"],
    )
    rate = view["prefix_hits"] / view["prefix_queries"] if view["prefix_queries"] else 0.0
    gauge("llamapy:prefix_cache_hit_rate", "Prefix-cache hit rate over prompt tokens.", rate)
    counter(
        "llamapy:preemptions", "Sequences preempted for lack of KV blocks.", view["preemptions"]
    )
    return generate_latest(reg)
