"""llama.cpp's tokenizer test vectors, from the llama-cpp-python sdist (fetched once, cached).

The sdist carries `vendor/llama.cpp/models/ggml-vocab-*.gguf` with `.gguf.inp` / `.gguf.out`
files; only those members are extracted into `~/.cache/llamapy/testdata/`.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

SDIST_VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
CACHE = Path.home() / ".cache" / "llamapy" / "testdata"
VOCAB_DIR = CACHE / f"llama.cpp-{SDIST_VERSION}-vocabs"
SEPARATOR = "\n__ggml_vocab_test__\n"

# Vocabs with test files in this sdist (checked by test_vocab_list_is_complete).
VOCABS = (
    "bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2",
    "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder",
)  # fmt: skip


def vocab_dir() -> Path:
    """The extracted vocab files, downloading the sdist with pip on first use."""
    marker = VOCAB_DIR / ".complete"
    if marker.exists():
        return VOCAB_DIR
    sdist = CACHE / SDIST
    if not sdist.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={SDIST_VERSION}", "-d", str(CACHE)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    VOCAB_DIR.mkdir(parents=True, exist_ok=True)
    prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/models/"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(prefix + "ggml-vocab-") and member.isfile():
                member.name = name[len(prefix) :]
                tar.extract(member, VOCAB_DIR, filter="data")
    marker.touch()
    return VOCAB_DIR


def load_cases(vocab: str) -> list[tuple[str, list[int]]]:
    """(input text, expected ids with add_special=False, parse_special=False) pairs."""
    base = vocab_dir() / f"ggml-vocab-{vocab}.gguf"
    raw = base.with_name(base.name + ".inp").read_bytes().decode("utf-8")
    inputs = raw.split(SEPARATOR)
    if inputs and inputs[-1] == "":
        inputs.pop()  # the file ends with a separator (test-tokenizer-0.cpp stops there)
    outputs = base.with_name(base.name + ".out").read_text(encoding="utf-8").split("\n")
    if outputs and outputs[-1] == "":
        outputs.pop()
    if len(inputs) != len(outputs):
        raise ValueError(f"{vocab}: {len(inputs)} inputs but {len(outputs)} outputs")
    return [(s, [int(x) for x in o.split()]) for s, o in zip(inputs, outputs, strict=True)]


def vocab_path(vocab: str) -> Path:
    return vocab_dir() / f"ggml-vocab-{vocab}.gguf"
