"""`llamapy chat` through a pseudo-terminal: prompt, streamed replies, commands, Ctrl-C, Ctrl-D,
and the history kept within the context."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamapy.cli.chat import Conversation, fit_prompt
from llamapy.errors import ContextLengthError

# The lead switches this to `-m llamapy chat` once the command is wired into cli/main.py.
CHAT = [sys.executable, "-m", "llamapy", "chat"]
TIMEOUT = 120.0  # seconds any one expected output may take (model load, a slow CI CPU)
PROMPT = r"\n> "
# A reply turn with --verbose: the formatted prompt on stderr, then the streamed reply.
REPLY = re.compile(r"\[prompt: (.*?)\]\n(.*?)\n> ", re.S)


def _take_controlling_tty() -> None:
    # Runs in the child after setsid(): the pty on fd 0 becomes its controlling terminal, so
    # a typed Ctrl-C reaches it as SIGINT through the line discipline, as in a real terminal.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    # As a shell does for a foreground job: pytest run as a background job (`pytest &`) has
    # SIGINT ignored, which exec keeps, and Python then leaves Ctrl-C ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A child process on a pseudo-terminal; every read has a deadline."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = os.openpty()
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_take_controlling_tty,
        )
        os.close(slave)
        self.fd = master
        self.raw = b""
        self.pos = 0  # where the next expect() starts looking

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace").replace("\r", "")

    def _read(self, until: float) -> bool:
        """Read what is there (waiting until `until`); False at end of output."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += data
        return bool(data)

    def expect(self, pattern: str | re.Pattern[str], timeout: float = TIMEOUT) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            if time.monotonic() > deadline or not self._read(deadline):
                raise AssertionError(f"no {regex.pattern!r} in output:\n{self.text[-3000:]}")

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def line(self, text: str) -> None:
        self.send(text + "\r")

    def wait(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(min(deadline, time.monotonic() + 0.2))  # keep the pty drained
        return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def _chat(*args: str) -> Iterator[Terminal]:
    term = Terminal([*CHAT, *args])
    try:
        yield term
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait(timeout=30)
        os.close(term.fd)


def _model(path: Path) -> tuple[str, ...]:
    # Greedy and short. One thread: on a machine busy with other tests, torch's thread pools
    # oversubscribe the cores and decoding becomes ten times slower.
    return ("-m", str(path), "--temp", "0", "-n", "4", "--verbose", "-t", "1")


def _reply(term: Terminal, message: str) -> tuple[str, str]:
    """Send `message`; the formatted prompt it produced and the streamed reply."""
    term.line(message)
    match = term.expect(REPLY)
    return match[1], match[2].strip()


@pytest.mark.models
def test_chat_session_commands_and_ctrl_c(smollm2_path: Path) -> None:
    with _chat(*_model(smollm2_path), "--system", "You are a pirate.") as term:
        term.expect(r"/help lists the commands")
        term.expect(PROMPT)
        term.line("/help")
        term.expect(r"/clear +forget the conversation")
        term.line("/nope")
        term.expect(r"\[unknown command /nope \(/help lists the commands\)\]")

        prompt1, reply1 = _reply(term, "What is the capital of France?")
        assert "You are a pirate." in prompt1 and "capital of France?" in prompt1
        assert reply1

        term.line("/system You are a poet.")
        term.expect(r"\[system message set\]")
        term.line("Tell me a long story about the sea.")
        # The prompt is printed once Ctrl-C stops the reply rather than the chat.
        prompt2 = term.expect(r"\[prompt: (.*?)\]\n")[1]
        term.send("\x03")
        term.expect(r"\[reply stopped\]")
        term.expect(PROMPT)
        assert "You are a poet." in prompt2 and "pirate" not in prompt2
        assert "capital of France?" in prompt2 and reply1 in prompt2  # the history is kept

        term.line("/clear")
        term.expect(r"\[conversation cleared\]")
        term.line("/system You are a pirat.\x1b[De")  # readline: cursor left, insert "e"
        term.expect(r"\[system message set\]")
        prompt3, reply3 = _reply(term, "What is the capital of France?")
        assert (prompt3, reply3) == (prompt1, reply1)  # a fresh start, greedy: the same reply

        term.line("/system")
        term.expect(r"\[system message: 'You are a pirate.'\]")
        term.line("/quit")
        assert term.wait() == 0


@pytest.mark.models
def test_chat_history_is_truncated_to_the_context(smollm2_path: Path) -> None:
    # Each turn takes about 54 of the 128 tokens: the third message drops the first turn.
    ask = (
        "Please answer in one short sentence, without any detail, explanation, example, list, "
        "code or markdown, and do not repeat this question or add a greeting before the answer."
    )
    with _chat(*_model(smollm2_path), "-c", "128", "--system", "Be brief.") as term:
        term.expect(PROMPT)
        prompt1, _ = _reply(term, f"Alpha: {ask}")
        prompt2, _ = _reply(term, f"Bravo: {ask}")
        assert "Alpha:" in prompt2

        term.line("Delta: " + "word " * 200)
        term.expect(r"\nerror: this message needs \d+ tokens .* the context holds 128")
        term.expect(PROMPT)
        prompt3, reply3 = _reply(term, f"Charlie: {ask}")
        assert "Alpha:" not in prompt3 and "Bravo:" in prompt3  # the oldest turn went
        assert "Delta:" not in prompt3 and reply3  # the error left the chat working
        assert all("Be brief." in p for p in (prompt1, prompt2, prompt3))  # the system stays

        term.send("\x04")  # Ctrl-D
        assert term.wait() == 0


@pytest.mark.models
def test_ctrl_c_at_the_prompt_exits_130(smollm2_path: Path) -> None:
    with _chat("-m", str(smollm2_path), "-t", "1") as term:
        term.expect(PROMPT)
        # CPython's readline notices a signal only when it interrupts its select(): one that
        # lands between the prompt and the select() waits for the next. Wait, and resend.
        rc = None
        for _ in range(3):
            time.sleep(0.5)
            term.send("\x03")
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = term.wait(timeout=10)
                break
        assert rc == 130
        assert "Traceback" not in term.text


def test_model_without_chat_template_is_one_line_error(tiny_gguf: Path) -> None:
    proc = subprocess.run(
        [*CHAT, "-m", str(tiny_gguf)], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--chat-template chatml" in lines[0], proc.stderr


class _WordLLM:
    """Stands in for LLM in fit_prompt: one token per word, 2 per message for the template."""

    def __init__(self, n_ctx: int) -> None:
        self.n_ctx = n_ctx

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return [0] * sum(2 + len(m["content"].split()) for m in messages)


def _turns(*words: int) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": "w " * n} for i, n in enumerate(words)]


def test_fit_prompt_drops_oldest_turn_pairs_and_keeps_the_system_message() -> None:
    conv = Conversation("s " * 8, _turns(10, 10, 20, 20, 5, 5))  # system 10, pairs 24, 44, 14
    user = "u " * 8  # 10
    assert fit_prompt(_WordLLM(200), conv, user, 50) == ([0] * 102, 0)
    assert fit_prompt(_WordLLM(100), conv, user, 10) == ([0] * 78, 1)
    assert fit_prompt(_WordLLM(50), conv, user, 10) == ([0] * 34, 2)
    # Not even the reply room is left: the reply gets what there is.
    assert fit_prompt(_WordLLM(25), conv, user, 10) == ([0] * 20, 3)
    with pytest.raises(ContextLengthError, match="needs 20 tokens"):
        fit_prompt(_WordLLM(20), conv, user, 10)
    assert len(conv.turns) == 6  # fitting never edits the history
