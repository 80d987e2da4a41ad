"""Start and stop live `llamapy serve` processes on 127.0.0.1 for the server tests."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOAD_TIMEOUT = 180.0  # seconds for the server to load the model on a busy CI machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    health_statuses: list[int] = field(default_factory=list)  # seen while waiting

    def client(self, timeout: float = 120.0, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return parse_metrics(text)

    def model_name(self) -> str:
        return httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"][0]["id"]


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([\w:]+) ([-+\d.eE]+|NaN)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


@contextlib.contextmanager
def serve(model: Path, *args: str, log_dir: Path) -> Iterator[Server]:
    """Start `llamapy serve` (one torch thread: the CI machine is shared), wait for /health
    to answer 200, stop it afterwards."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    argv = [sys.executable, "-m", "llamapy", "serve", "-m", str(model), "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*argv, "-t", "1", *args], stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        _wait_ready(server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log.read_text()[-3000:]}")
        try:
            status = httpx.get(f"{server.url}/health", timeout=5).status_code
            server.health_statuses.append(status)
            if status == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready in {LOAD_TIMEOUT}s:\n{server.log.read_text()[-3000:]}")
