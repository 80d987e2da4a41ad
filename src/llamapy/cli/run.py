"""`llamapy run [PROMPT]`: generate once from a prompt, streamed, with llama.cpp-style timings."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llamapy.cli.common import add_model_args, add_sampling_args, load_llm, sampling_params
from llamapy.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="generate text from a prompt",
        description="Generate text from a prompt with the model (default smollm2-135m). Chat "
        "models get their chat template unless --raw. Text streams to stdout; timings go "
        "to stderr.",
    )
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT")
    p.add_argument(
        "-p",
        "--prompt",
        dest="prompt_opt",
        default=None,
        metavar="PROMPT",
        help="the prompt (same as PROMPT)",
    )
    p.add_argument("-f", "--file", default=None, metavar="FILE", help="read the prompt from FILE")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message (chat models)")
    p.add_argument("--raw", action="store_true", help="no chat template: complete the text as is")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when TEXT is generated (repeatable)",
    )
    p.add_argument("--no-stream", action="store_true", help="print the text when done")
    p.add_argument("--verbose", action="store_true", help="print the formatted prompt to stderr")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def _read_prompt(args: argparse.Namespace) -> str:
    given = [x for x in (args.prompt, args.prompt_opt) if x is not None]
    if args.file is not None:
        try:
            given.append(Path(args.file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {args.file}: {e}") from None
    if len(given) > 1:
        raise UsageError("give the prompt once: PROMPT, -p or -f")
    if not given:
        if sys.stdin.isatty():
            raise UsageError("no prompt: give PROMPT, -p PROMPT or -f FILE")
        given.append(sys.stdin.read())
    return given[0]


def run(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    try:
        params = sampling_params(args, tuple(args.stop))
    except ValueError as e:
        raise UsageError(str(e)) from None
    llm = load_llm(args)
    if args.raw or llm.chat_template is None:
        prompt_ids = llm.tokenize(prompt)
    else:
        messages = [{"role": "user", "content": prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt_ids = llm.apply_chat_template(messages)
    if not prompt_ids:  # --raw "" on a model that adds no BOS: nothing to continue from
        raise UsageError("the prompt is empty: give some text to complete")
    if args.verbose:
        print(f"[prompt: {llm.detokenize(prompt_ids)!r}]", file=sys.stderr)
    t0 = time.perf_counter()
    t_first = None
    usage = None
    pieces = []
    for piece in llm.stream(prompt_ids, params):
        if t_first is None:
            t_first = time.perf_counter()
        if args.no_stream:
            pieces.append(piece.text)
        else:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        usage = piece.usage or usage
    t_end = time.perf_counter()
    if args.no_stream:
        sys.stdout.write("".join(pieces))
    sys.stdout.write("\n")
    _print_timings(llm.load_time, t0, t_first or t_end, t_end, usage)
    return 0


def _print_timings(load: float, t0: float, t_first: float, t_end: float, usage) -> None:
    n_prompt = usage.prompt_tokens if usage else 0
    n_gen = usage.completion_tokens if usage else 0
    prompt_s, gen_s = t_first - t0, t_end - t_first
    rate = lambda n, s: n / s if s > 0 else 0.0  # noqa: E731
    print(f"\nllamapy: load time    = {load * 1e3:10.2f} ms", file=sys.stderr)
    print(
        f"llamapy: prompt eval  = {prompt_s * 1e3:10.2f} ms / {n_prompt:5d} tokens "
        f"({rate(n_prompt, prompt_s):8.2f} tokens per second)",
        file=sys.stderr,
    )
    # The first token comes out of the prompt pass; the rest are decode steps.
    print(
        f"llamapy: eval time    = {gen_s * 1e3:10.2f} ms / {max(n_gen - 1, 0):5d} runs   "
        f"({rate(max(n_gen - 1, 0), gen_s):8.2f} tokens per second)",
        file=sys.stderr,
    )
