"""Serving benchmark: N concurrent clients stream completions from a llamapy (or any
OpenAI-compatible) server; requests/s, output tokens/s, TTFT and time per output token.

Prompts are random token ids (lengths drawn from --prompt-len), outputs have exact lengths
(--output-len, with ignore_eos), so runs are comparable. --baseline repeats the same requests
with one client and prints the throughput ratio.

    python benchmarks/serve_bench.py --model smollm2-135m --clients 4 --requests 16 \\
        --prompt-len 32:128 --output-len 16:64 --threads 2
    python benchmarks/serve_bench.py --url http://127.0.0.1:8080 --json result.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
from bench_args import token_range


@dataclass
class Result:
    prompt_tokens: int
    output_tokens: int
    ttft: float  # seconds to the first token
    latency: float  # seconds to the last one

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def make_requests(args: argparse.Namespace) -> list[dict]:
    rng = random.Random(args.seed)
    reqs = []
    for _ in range(args.requests):
        n_in, n_out = rng.randint(*args.prompt_len), rng.randint(*args.output_len)
        prompt = [rng.randint(1000, 20000) for _ in range(n_in)]  # ordinary-word ids
        reqs.append(
            {
                "prompt": prompt,
                "max_tokens": n_out,
                "ignore_eos": True,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return reqs


async def one_request(client: httpx.AsyncClient, body: dict) -> Result:
    t0 = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if ttft is None and any(c.get("text") for c in event.get("choices", [])):
                ttft = time.perf_counter() - t0
            usage = event.get("usage") or usage
    latency = time.perf_counter() - t0
    n_out = usage["completion_tokens"] if usage else body["max_tokens"]
    return Result(len(body["prompt"]), n_out, ttft if ttft is not None else latency, latency)


async def run_load(url: str, reqs: list[dict], clients: int) -> tuple[list[Result], float]:
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    results: list[Result] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await one_request(client, queue.get_nowait()))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return results, time.perf_counter() - t0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pick(q: float) -> float:  # nearest rank
        return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]

    return {"p50": pick(50), "p90": pick(90), "p99": pick(99), "mean": sum(s) / len(s)}


def summarize(results: list[Result], wall: float, clients: int) -> dict:
    out_tokens = sum(r.output_tokens for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tokens_per_s": out_tokens / wall,
        "total_tokens_per_s": (out_tokens + sum(r.prompt_tokens for r in results)) / wall,
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "output_tokens": out_tokens,
        "ttft_s": percentiles([r.ttft for r in results]),
        "tpot_s": percentiles([t for r in results if (t := r.tpot) is not None]),
        "latency_s": percentiles([r.latency for r in results]),
    }


def print_table(s: dict) -> None:
    print(f"clients {s['clients']}, {s['requests']} requests in {s['wall_s']:.2f} s")
    print(f"  requests/s        {s['requests_per_s']:10.3f}")
    print(f"  output tokens/s   {s['output_tokens_per_s']:10.2f}")
    print(f"  total tokens/s    {s['total_tokens_per_s']:10.2f}")
    print(f"  {'(ms)':16} {'p50':>10} {'p90':>10} {'p99':>10} {'mean':>10}")
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("latency_s", "latency")):
        p = s[key]
        cells = "".join(f"{p[k] * 1e3:10.1f} " for k in ("p50", "p90", "p99", "mean")) if p else ""
        print(f"  {name:16} {cells}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def own_server(args: argparse.Namespace) -> Iterator[str]:
    """Start `llamapy serve` for the run; its URL once /health answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "llamapy", "serve", "-m", args.model, "--port", str(port)]
    cmd += ["-np", str(args.parallel), "-c", str(args.ctx_size)]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError("server did not become ready in 300 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--model", help="start `llamapy serve -m MODEL` for the run")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=token_range, default=(64, 256), metavar="A:B")
    p.add_argument("--output-len", type=token_range, default=(32, 128), metavar="A:B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", action="store_true", help="also run with 1 client; ratio")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    p.add_argument("--parallel", type=int, default=8, help="with --model: -np")
    p.add_argument("--ctx-size", type=int, default=2048, help="with --model: -c")
    p.add_argument("--threads", type=int, default=None, help="with --model: -t")
    args = p.parse_args()

    reqs = make_requests(args)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(own_server(args))
        asyncio.run(run_load(url, reqs[:1], 1))  # warm-up
        runs = [summarize(*asyncio.run(run_load(url, reqs, args.clients)), args.clients)]
        if args.baseline:
            runs.append(summarize(*asyncio.run(run_load(url, reqs, 1)), 1))
    for s in runs:
        print_table(s)
    report: dict = {"runs": runs, "args": {k: v for k, v in vars(args).items() if k != "json"}}
    if args.baseline:
        ratio = runs[0]["output_tokens_per_s"] / runs[1]["output_tokens_per_s"]
        report["throughput_ratio_vs_1_client"] = ratio
        print(f"output tokens/s, {args.clients} clients vs 1: {ratio:.2f}x")
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
