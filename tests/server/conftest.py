"""The live server the server tests share (helpers in live_server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import Server, serve


@pytest.fixture(scope="session")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The main server, shared by the server tests: metrics on, 16 slots, 1024-token context."""
    logs = tmp_path_factory.mktemp("server")
    with serve(smollm2_path, "--metrics", "-c", "1024", "-np", "16", log_dir=logs) as s:
        yield s
