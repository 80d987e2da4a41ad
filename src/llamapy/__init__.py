"""llamapy: an LLM inference engine and server in Python."""

from llamapy.errors import (
    ContextLengthError,
    DownloadError,
    LlamapyError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "ContextLengthError",
    "DownloadError",
    "LlamapyError",
    "ModelFormatError",
    "ModelNotFoundError",
    "UnsupportedError",
    "__version__",
]
