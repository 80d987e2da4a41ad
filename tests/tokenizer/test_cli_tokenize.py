"""`llamapy tokenize` / `llamapy detokenize` through the real entry point."""

from __future__ import annotations

import json

import pytest
from vocab_data import vocab_path

from llamapy.cli import main as cli_main
from llamapy.cli import tokenize as tokenize_cli
from llamapy.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def _with_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # until the lead adds the module to COMMANDS in cli/main.py
    if tokenize_cli not in cli_main.COMMANDS:
        monkeypatch.setattr(cli_main, "COMMANDS", (*cli_main.COMMANDS, tokenize_cli))


def test_tokenize_ids_match_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(vocab_path("llama-spm"))
    assert cli_main.main(["tokenize", path, "Hello world", "--ids"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == Tokenizer.from_gguf(path).encode("Hello world")
    assert ids[0] == 1  # BOS
    assert cli_main.main(["tokenize", path, "Hello world", "--ids", "--no-bos"]) == 0
    assert json.loads(capsys.readouterr().out) == ids[1:]


def test_tokenize_pieces_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(vocab_path("llama-spm"))
    assert cli_main.main(["tokenize", path, "Hello", "--pieces", "--no-bos"]) == 0
    assert capsys.readouterr().out == "'▁Hello'\n"
    assert cli_main.main(["tokenize", path, "<s>x", "--parse-special"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "1" and lines[1].split()[0] == "1"


def test_detokenize(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(vocab_path("llama-spm"))
    ids = Tokenizer.from_gguf(path).encode("Hello world")
    assert cli_main.main(["detokenize", path, *map(str, ids)]) == 0
    assert capsys.readouterr().out == "<s> Hello world\n"
    assert cli_main.main(["detokenize", path, json.dumps(ids), "--skip-special"]) == 0
    # llama_detokenize(remove_special=true) drops the BOS and keeps the SPM prefix space
    assert capsys.readouterr().out == " Hello world\n"


BAD_IDS = [(["12", "x3"], "'x3' is not a token id"), (["99999999"], "outside the vocabulary")]


@pytest.mark.parametrize(("ids", "message"), BAD_IDS)
def test_detokenize_bad_ids(
    ids: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main.main(["detokenize", str(vocab_path("llama-spm")), *ids]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
