"""Per-token cost of grammar-constrained decoding against unconstrained decoding, batch 1.

Each repeat runs, interleaved in one sitting, (a) a constrained generation (greedy, until
the grammar completes) and (b) an unconstrained one of exactly as many tokens (greedy,
ignore_eos), and times every decode step through the engine (the prefill step excluded).
The ratio of median per-token times is the overhead: mask computation in the worker thread
(overlapped with the forward pass), its copy and application on the logits, and advancing
the matcher.

    python benchmarks/structured_bench.py                      # JSON schema, 7 repeats
    python benchmarks/structured_bench.py --kind gbnf --repeats 5 -t 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from llamapy import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
    },
    "required": ["name", "age", "role", "address", "tags"],
}

# a JSON value grammar in llama.cpp's GBNF (its grammars/json.gbnf, abridged)
GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"""

PROMPT = "Write a JSON record for a user of a web shop: name, age, role, address, tags."


def _constraint(kind: str) -> dict[str, object]:
    if kind == "json":
        return {"json_schema": SCHEMA}
    if kind == "gbnf":
        return {"grammar": GBNF}
    return {"regex": r"(user|admin)-[a-z]{3,12}@[a-z]{3,10}\.(com|org|net)( [0-9]{2,4}){1,20}"}


def _decode_times(llm: LLM, ids: list[int], params: SamplingParams) -> tuple[list[float], str]:
    """Seconds of each decode step (one token each; the prefill step left out), the text."""
    engine = llm.engine
    engine.add_request(ids, params)
    times, text, finished = [], "", False
    first = True
    while not finished:
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        for o in outs:
            text += o.text
            finished = o.finished
        if outs and not first:
            times.append(dt)
        first = first and not outs
    return times, text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("--kind", choices=("json", "gbnf", "regex"), default="json")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON line too")
    args = p.parse_args()

    llm = LLM(args.model, n_threads=args.threads, max_num_seqs=1)
    ids = llm.apply_chat_template([{"role": "user", "content": PROMPT}])
    constrained = SamplingParams.greedy(max_tokens=args.max_tokens, **_constraint(args.kind))
    _decode_times(llm, ids, constrained)  # warm-up; builds the llguidance tokenizer
    per_tok: dict[str, list[float]] = {"constrained": [], "plain": []}
    n_tokens = 0
    for r in range(args.repeats):
        # alternate which goes first, so drift in machine load hits both alike
        order = ("constrained", "plain") if r % 2 == 0 else ("plain", "constrained")
        for which in order:
            if which == "constrained":
                times, text = _decode_times(llm, ids, constrained)
                n_tokens = len(times) + 1
            else:
                plain = SamplingParams.greedy(max_tokens=n_tokens or 64, ignore_eos=True)
                times, _ = _decode_times(llm, ids, plain)
            per_tok[which].append(statistics.median(times))
    c = statistics.median(per_tok["constrained"])
    u = statistics.median(per_tok["plain"])
    print(f"output ({n_tokens} tokens): {text}")
    for which, xs in per_tok.items():
        print(f"{which:12s} ms/token per repeat: " + " ".join(f"{1e3 * x:.2f}" for x in xs))
    print(
        f"{args.kind}: constrained {1e3 * c:.2f} ms/token, unconstrained {1e3 * u:.2f} ms/token, "
        f"ratio {c / u:.3f} (overhead {100 * (c / u - 1):+.1f}%), {args.repeats} repeats"
    )
    if args.json:
        row = {"kind": args.kind, "constrained_ms": 1e3 * c, "plain_ms": 1e3 * u, "ratio": c / u}
        print(json.dumps({**row, "tokens": n_tokens, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
