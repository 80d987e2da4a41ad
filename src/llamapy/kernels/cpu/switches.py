"""On/off environment switches of the CPU paths (LLAMAPY_CPU_COMPILE, LLAMAPY_CPU_VNNI,
LLAMAPY_CPU_VNNI_Q6K, LLAMAPY_MALLOC_TUNE): on by default, off for 0 / false / no / off
(any case)."""

from __future__ import annotations

import os

OFF_VALUES = ("0", "false", "no", "off")


def switched_off(name: str) -> bool:
    """Whether the environment variable `name` turns its feature off."""
    return os.environ.get(name, "1").strip().lower() in OFF_VALUES
