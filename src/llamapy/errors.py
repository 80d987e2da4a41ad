"""Exceptions a user can act on. The CLI prints their message as one line, exit code 2."""


class LlamapyError(Exception):
    """Base class of every error llamapy raises on purpose for a user to read."""


class ModelFormatError(LlamapyError):
    """A model file or folder is malformed, truncated or of a kind llamapy cannot read."""


class ModelNotFoundError(LlamapyError):
    """A model argument names no file, folder or alias that can be resolved."""


class DownloadError(LlamapyError):
    """Fetching a model failed (no network, registry refused, checksum mismatch)."""


class UnsupportedError(LlamapyError):
    """A valid file uses something llamapy does not implement (architecture, quant type)."""


class ContextLengthError(LlamapyError):
    """A prompt (or prompt + requested tokens) does not fit the context window."""


class InsufficientMemoryError(LlamapyError):
    """The machine or GPU lacks the memory a setting asks for (the KV cache of a huge -c)."""


class UsageError(LlamapyError):
    """Bad command-line input: printed as one line, exit code 2."""
