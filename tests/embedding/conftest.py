"""Fixtures of the embedding tests: minilm-l6 loaded by llamapy and by sentence-transformers
(the oracle: the model's own library, test-only)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def st_minilm(minilm_path: Path):
    st = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers (dev extra) is the oracle"
    )
    return st.SentenceTransformer(str(minilm_path), device="cpu")


@pytest.fixture(scope="session")
def minilm_llm(minilm_path: Path):
    from llamapy.api import LLM

    return LLM(minilm_path)
