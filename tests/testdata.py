"""Test data fetched once from PyPI and cached: llama.cpp's own test files.

The llama-cpp-python sdist vendors llama.cpp with its test vocabularies
(``models/ggml-vocab-*.gguf`` with ``.inp``/``.out`` cases), chat templates
(``models/templates/*.jinja``) and tests (``tests/test-chat-template.cpp``). It is fetched
with pip into ``<cache>/testdata/`` (``$LLAMAPY_CACHE`` or ``~/.cache/llamapy``) and never
committed. Safe under concurrent test runs: a file lock serializes the fetch, and the
download and the extraction land under their final names only by atomic rename, so a killed
run never leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from filelock import FileLock

from llamapy.hub import cache_dir

# Pinned, so that every run tests against the same llama.cpp files.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_LOCK_TIMEOUT_S = 1200  # another run may be downloading (76 MB) and extracting


def testdata_dir() -> Path:
    """``<cache>/testdata``: the folder for fetched test data (created)."""
    path = cache_dir() / "testdata"
    path.mkdir(parents=True, exist_ok=True)
    return path


def llama_cpp_sdist() -> Path:
    """The ``vendor/llama.cpp`` folder of the pinned llama-cpp-python sdist, fetched and
    extracted on first use.

    Raises:
        RuntimeError: pip could not fetch the sdist (no network, PyPI refused) or its
            sha256 is not the pinned one.
    """
    root = testdata_dir()
    stem = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    extracted = root / stem
    vendor = extracted / "vendor" / "llama.cpp"
    if vendor.is_dir():  # present only after a complete extraction (atomic rename)
        return vendor
    with FileLock(str(root / f"{stem}.lock"), timeout=_LOCK_TIMEOUT_S):
        if not vendor.is_dir():
            _extract(_sdist_tarball(root, stem), root, stem)
    return vendor


def _sdist_tarball(root: Path, stem: str) -> Path:
    tarball = root / f"{stem}.tar.gz"
    if tarball.is_file() and _sha256(tarball) == LLAMA_CPP_PYTHON_SHA256:
        return tarball
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-d", tmp,
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / tarball.name
        if result.returncode != 0 or not fetched.is_file():
            raise RuntimeError(
                f"pip could not download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}: "
                f"{result.stderr.strip()[-2000:]}"
            )
        digest = _sha256(fetched)
        if digest != LLAMA_CPP_PYTHON_SHA256:
            raise RuntimeError(
                f"{tarball.name} from PyPI has sha256 {digest}, expected {LLAMA_CPP_PYTHON_SHA256}"
            )
        fetched.replace(tarball)
    return tarball


def _extract(tarball: Path, root: Path, stem: str) -> None:
    prefix = f"{stem}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
    try:
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp, members=members, filter="data")
        try:
            (tmp / stem).rename(root / stem)
        except OSError:
            if not (root / stem / "vendor" / "llama.cpp").is_dir():
                raise  # not a lost race with another extraction
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
