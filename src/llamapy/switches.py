"""On/off environment switches: LLAMAPY_CPU_COMPILE, LLAMAPY_CPU_NATIVE_STEP, LLAMAPY_CPU_VNNI,
LLAMAPY_CPU_ATTENTION, LLAMAPY_MALLOC_TUNE, LLAMAPY_TOKENIZER_CACHE, LLAMAPY_GPU_X_CODES,
LLAMAPY_GPU_X_CODES_PDL, LLAMAPY_GPU_X_CODES_PIPE_PDL and LLAMAPY_GPU_ROPE_TABLES on by
default, off for 0 / false / no / off (any case); LLAMAPY_CPU_VNNI_Q6K and LLAMAPY_CPU_GUARDS
off by default, on for 1 / true / yes / on. Standard library only: the tokenizer reads it
without importing torch."""

from __future__ import annotations

import os

OFF_VALUES = ("0", "false", "no", "off")


def switched_off(name: str) -> bool:
    """Whether the environment variable `name` turns its feature off."""
    return os.environ.get(name, "1").strip().lower() in OFF_VALUES


ON_VALUES = ("1", "true", "yes", "on")


def switched_on(name: str) -> bool:
    """Whether the environment variable `name` turns its (default off) feature on."""
    return os.environ.get(name, "0").strip().lower() in ON_VALUES
