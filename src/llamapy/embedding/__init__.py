"""Embeddings and reranking: pooled vectors and relevance scores from encoders and decoders."""

from llamapy.embedding.batch import EncoderInput
from llamapy.embedding.engine import ENCODER_ARCHS, EmbeddingEngine, RerankResult, rank
from llamapy.embedding.pooling import POOLING_TYPES, normalize

__all__ = [
    "ENCODER_ARCHS",
    "POOLING_TYPES",
    "EmbeddingEngine",
    "EncoderInput",
    "RerankResult",
    "normalize",
    "rank",
]
