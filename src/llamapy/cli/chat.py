"""`llamapy chat`: an interactive multi-turn chat in the terminal, like llama.cpp's llama-run
(and llama-cli's conversation mode).

Behaviour a user can rely on:
- The history is kept within the context: before each reply, the oldest user/assistant turns
  are dropped (the system message is kept) until the conversation leaves `reply_room` tokens
  free. A message that does not fit even alone gets a one-line error; the chat goes on.
- Ctrl-C during a reply stops it at the next token (the engine is never interrupted
  mid-step) and keeps the text generated so far as the assistant turn, as llama-cli keeps
  those tokens in its context; a reply stopped before any text drops the user message too.
  A second Ctrl-C during the same reply leaves at once.
- Ctrl-C at the prompt leaves with exit code 130 (like `llamapy`'s other commands);
  /quit and end of input (Ctrl-D) leave with 0.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamapy.cli.common import add_model_args, add_sampling_args, load_llm, sampling_params
from llamapy.errors import ContextLengthError, UsageError
from llamapy.tokenizer.chat_template import TemplateError

if TYPE_CHECKING:
    from llamapy.api import LLM
    from llamapy.sampling.params import SamplingParams

PROMPT = "> "
HELP = """\
/system TEXT  set the system message (the conversation is kept)
/system       show the system message
/clear        forget the conversation (the system message is kept)
/help         this list
/quit         leave (also /exit or Ctrl-D)
Ctrl-C stops a reply; at the prompt it leaves. Start a line with // to send a literal /."""
# Tokens kept free for a reply when -n is not given (as llama-run's default batch).
DEFAULT_REPLY_ROOM = 512


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="An interactive multi-turn chat with the model (default smollm2-135m). Type "
        "/help in the chat for its commands. Ctrl-C stops a reply; at the prompt it leaves.",
    )
    p.add_argument("--system", default=None, metavar="TEXT", help="the system message")
    p.add_argument("--verbose", action="store_true", help="print each formatted prompt to stderr")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=chat)


@dataclass(slots=True)
class Conversation:
    """The system message and the finished turns, alternating user and assistant."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user: str, num_dropped: int = 0) -> list[dict[str, str]]:
        """The messages for a reply to `user`, without the `num_dropped` oldest turn pairs."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns[2 * num_dropped :], {"role": "user", "content": user}]


def fit_prompt(llm: LLM, conv: Conversation, user: str, reply_room: int) -> tuple[list[int], int]:
    """The prompt ids for a reply to `user` and how many oldest turn pairs were left out so
    that `reply_room` tokens stay free in `llm.n_ctx`.

    When `user` with the system message alone leaves less than `reply_room`, the reply gets
    what is left; when it leaves nothing, ContextLengthError.
    """
    num_pairs = len(conv.turns) // 2
    for num_dropped in range(num_pairs + 1):
        ids = llm.apply_chat_template(conv.messages(user, num_dropped))
        if len(ids) + reply_room <= llm.n_ctx:
            return ids, num_dropped
    if len(ids) < llm.n_ctx:
        return ids, num_pairs
    raise ContextLengthError(
        f"this message needs {len(ids)} tokens with the system message but the context "
        f"holds {llm.n_ctx}; shorten it or raise -c"
    )


class _StopOnSigint:
    """While a reply streams, the first SIGINT asks it to stop at the next token; a second
    one raises KeyboardInterrupt (as llama-cli's sigint_handler)."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> _StopOnSigint:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _reply(
    llm: LLM, conv: Conversation, user: str, params: SamplingParams, reply_room: int, verbose: bool
) -> None:
    """Stream the reply to `user` to stdout and add the turn to `conv`."""
    ids, num_dropped = fit_prompt(llm, conv, user, reply_room)
    pieces: list[str] = []
    with _StopOnSigint() as sigint:
        if verbose:
            print(f"[prompt: {llm.detokenize(ids)!r}]", file=sys.stderr, flush=True)
        with contextlib.closing(llm.stream(ids, params)) as stream:
            for piece in stream:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
                pieces.append(piece.text)
                if sigint.requested:
                    break
        sys.stdout.write("\n")
        sys.stdout.flush()
    text = "".join(pieces)
    if sigint.requested:
        print("[reply stopped]", file=sys.stderr, flush=True)
        if not text:
            return
    del conv.turns[: 2 * num_dropped]
    conv.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]


def _command(line: str, conv: Conversation) -> bool:
    """Run a /command; False when the chat should end."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/clear":
        conv.turns.clear()
        _note("conversation cleared")
    elif name == "/system" and rest:
        conv.system = rest
        _note("system message set")
    elif name == "/system":
        _note(f"system message: {conv.system!r}")
    elif name == "/help":
        print(HELP, flush=True)
    else:
        _note(f"unknown command {name} (/help lists the commands)")
    return True


def _note(text: str) -> None:
    print(f"[{text}]", file=sys.stderr, flush=True)


def _read_line(interactive: bool) -> str | None:
    """The next line from the user, or None at end of input."""
    sys.stdout.flush()
    try:
        return input(PROMPT if interactive else "")
    except EOFError:
        if interactive:
            sys.stdout.write("\n")
        return None


def _enable_line_editing() -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (input() gets line editing and history)


def chat(args: argparse.Namespace) -> int:
    try:
        params = sampling_params(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    llm = load_llm(args)
    if llm.chat_template is None:
        raise UsageError(
            "this model has no chat template; pass --chat-template chatml (or another "
            "template name or a Jinja file)"
        )
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
        _note(f"{llm.n_ctx} tokens of context; /help lists the commands, Ctrl-D leaves")
    max_reply = DEFAULT_REPLY_ROOM if params.max_tokens is None else params.max_tokens
    reply_room = max(1, min(max_reply, llm.n_ctx // 4))
    conv = Conversation(args.system)
    try:
        while (line := _read_line(interactive)) is not None:
            line = line.strip()
            if line.startswith("/") and not line.startswith("//"):
                if not _command(line, conv):
                    break
            elif line:
                user = line[1:] if line.startswith("//") else line
                try:
                    _reply(llm, conv, user, params, reply_room, args.verbose)
                except (ContextLengthError, TemplateError) as e:
                    print(f"error: {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    return 0
