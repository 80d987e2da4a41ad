"""Shared fixtures: small synthetic GGUF files and the real models (fetched once, cached)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU, Triton kernels run in the interpreter on CPU tensors (small shapes). Triton
# reads the switch when a kernel is decorated, so it is set before any test imports one.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# The CPU decode step is compiled by default (models/cpu_compile.py) where the native step
# (models/cpu_step.py, no compile: it runs in the suite wherever it can) does not take it:
# seconds per model at load, minutes over the suite. Tests run it eagerly unless they ask
# for it (tests/models/test_cpu_compile.py, the fidelity tests).
os.environ.setdefault("LLAMAPY_CPU_COMPILE", "0")

from gguf_factory import write_tiny_llama  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh randomness each run; the seed is printed so a failure can be replayed
    (LLAMAPY_TEST_SEED=<seed> pytest <test id>)."""
    replay = os.environ.get("LLAMAPY_TEST_SEED")
    seed = int(replay) if replay else int(np.random.SeedSequence().entropy % 2**32)
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every float tensor from torch.empty (the kernels' outputs and workspaces) starts as
    NaN, so an element a kernel forgets to write shows up."""
    import torch

    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture
def tiny_gguf(tmp_path: Path, rng: np.random.Generator) -> Path:
    return write_tiny_llama(tmp_path / "tiny.gguf", rng=rng)


def _resolve(alias: str) -> Path:
    from llamapy.hub import resolve_model

    return resolve_model(alias).path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _resolve("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _resolve("gemma3-270m")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return _resolve("minilm-l6")
