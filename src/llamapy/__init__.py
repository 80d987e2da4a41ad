"""llamapy: an LLM inference engine and server in Python."""

from llamapy.errors import (
    ContextLengthError,
    DownloadError,
    InsufficientMemoryError,
    LlamapyError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedError,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (torch, the engine) only when the API is used, so `llamapy --help` and
    # the error types stay quick to import.
    if name == "LLM":
        from llamapy.api import LLM

        return LLM
    if name == "SamplingParams":
        from llamapy.sampling.params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'llamapy' has no attribute {name!r}")


__all__ = [
    "LLM",
    "SamplingParams",
    "ContextLengthError",
    "DownloadError",
    "InsufficientMemoryError",
    "LlamapyError",
    "ModelFormatError",
    "ModelNotFoundError",
    "UnsupportedError",
    "__version__",
]
