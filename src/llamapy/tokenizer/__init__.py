"""Text <-> token ids with llama.cpp's semantics, backed by the Rust `tokenizers` library."""

from llamapy.tokenizer.chat_template import (
    ChatTemplate,
    TemplateError,
    list_named_templates,
    resolve_chat_template,
)
from llamapy.tokenizer.detokenizer import IncrementalDetokenizer
from llamapy.tokenizer.tokenizer import TokenIdError, Tokenizer
from llamapy.tokenizer.vocab import TokenAttr, Vocab, vocab_from_gguf

__all__ = [
    "ChatTemplate",
    "TemplateError",
    "list_named_templates",
    "resolve_chat_template",
    "IncrementalDetokenizer",
    "TokenAttr",
    "TokenIdError",
    "Tokenizer",
    "Vocab",
    "vocab_from_gguf",
]
