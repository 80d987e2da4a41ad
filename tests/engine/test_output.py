"""TextStream: stop strings across token boundaries, end-of-generation, holdback release."""

from __future__ import annotations

import random

import pytest

from llamapy.engine.output import TextStream
from llamapy.engine.sequence import FinishReason
from llamapy.sampling.params import SamplingParams
from llamapy.tokenizer import Tokenizer

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def tok(smollm2_path) -> Tokenizer:
    return Tokenizer.from_path(smollm2_path)


def _feed(stream: TextStream, ids: list[int]) -> tuple[str, FinishReason | None]:
    out = []
    for t in ids:
        text, reason = stream.add(t)
        out.append(text)
        if reason is not None:
            return "".join(out), reason
    text, reason = stream.finish(FinishReason.LENGTH)
    return "".join(out) + text, reason


def test_no_stop_reproduces_decode(tok: Tokenizer) -> None:
    ids = tok.encode("Hello, wörld! 你好 🦙 done.", add_special=False)
    text, reason = _feed(TextStream(tok, SamplingParams()), ids)
    assert text == tok.decode(ids) and reason == FinishReason.LENGTH


@pytest.mark.parametrize("stop", ["world", "o, w", "!", "🦙", "lo"])
def test_stop_string_found_across_tokens(tok: Tokenizer, stop: str) -> None:
    full = "Hello, world! 🦙 and more text after"
    ids = tok.encode(full, add_special=False)
    text, reason = _feed(TextStream(tok, SamplingParams(stop=(stop, "never-matches"))), ids)
    assert reason == FinishReason.STOP
    assert text == full[: full.index(stop)]


def test_earliest_of_several_stops_wins(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four", add_special=False)
    text, reason = _feed(TextStream(tok, SamplingParams(stop=("four", "two"))), ids)
    assert (text, reason) == ("one ", FinishReason.STOP)


def test_end_of_generation_token_stops_and_is_not_text(tok: Tokenizer) -> None:
    eog = sorted(tok.eog_ids)[0]
    ids = tok.encode("Hi there", add_special=False) + [eog] + tok.encode(" more", add_special=False)
    text, reason = _feed(TextStream(tok, SamplingParams()), ids)
    assert (text, reason) == ("Hi there", FinishReason.STOP)
    ignoring = TextStream(tok, SamplingParams(ignore_eos=True))
    _, reason = ignoring.add(eog)
    assert reason is None


def test_streamed_pieces_never_exceed_final_text(tok: Tokenizer) -> None:
    rng = random.Random()
    words = ["alpha", "beta", "gamma", "STOP", "delta", " ", "\n", "é", "ß"]
    full = "".join(rng.choice(words) for _ in range(60))
    ids = tok.encode(full, add_special=False)
    stream = TextStream(tok, SamplingParams(stop=("STOP",)))
    emitted = ""
    for t in ids:
        piece, reason = stream.add(t)
        emitted += piece
        assert "STOP" not in emitted
        if reason:
            break
    else:
        emitted += stream.finish(FinishReason.LENGTH)[0]
    expected = full[: full.index("STOP")] if "STOP" in full else full
    assert emitted == expected
