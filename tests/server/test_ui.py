"""The web page at / in headless Chromium (driven by playwright-core from npm): a streamed
reply appears, Stop ends a reply, the conversation survives a reload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.models

UI_DIR = Path(__file__).parent / "ui"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def test_index_is_served(server):
    r = httpx.get(f"{server.url}/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "AbortController" in r.text


def test_chat_in_a_browser(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (UI_DIR / "node_modules" / "playwright-core").exists():
        pytest.skip(f"playwright-core is not installed (npm install --prefix {UI_DIR})")
    shot = tmp_path / "chat.png"
    before = server.metrics()
    run = subprocess.run(
        ["node", str(UI_DIR / "chat.mjs"), f"{server.url}/", str(shot)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    print(found, f"screenshot: {shot}")
    assert found["reply"].strip(), "no streamed reply appeared"
    assert found["model"] == server.model_name()
    assert found["stopped"].strip()  # what streamed before Stop stays on the page
    assert found["stop_disabled"]
    # Stop reached the server: the 400-token count ended early (server-side abort)
    after = server.metrics()
    produced = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    assert produced < 150 and after["llamacpp:requests_processing"] == 0
    assert found["bubbles_after_reload"] == 4  # 2 questions, 2 replies from localStorage
    assert found["page_errors"] == []
