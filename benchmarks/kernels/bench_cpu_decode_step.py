#!/usr/bin/env python
"""One compiled CPU decode step (model forward + logits of a one-token batch at a fixed
context) under variants of `models/cpu_compile.py`, interleaved in one process:

    python benchmarks/kernels/bench_cpu_decode_step.py MODEL [--ctx 128] [--reps 30]
        [--variants native,default,asserts,stack,stack-cpp,inductor-attn]

native    the engine's step where the model's matmuls are all VNNI: one numba call
          (models/cpu_step.py), its attention on two threads from ATTN_PARALLEL_MIN_KEYS keys
native-t1 / native-t2  the same with the attention always on one thread / on all threads
default   the compiled step (one graph per kind of layer, INDUCTOR_OPTIONS)
inductor-attn  the same with the attention left to Inductor (LLAMAPY_CPU_ATTENTION=0 while
          it traces) instead of kernels/cpu/attention.py's op
asserts   the same with Inductor's input size / stride / scalar / alignment asserts back on
cpp       the same with Inductor's C++ wrapper
stack     every layer in one graph (its own compile: tens of seconds cold)
stack-cpp the same with Inductor's C++ wrapper

Prints per variant the min / p25 / median milliseconds of `--reps` runs of 10 steps, and the
largest logit difference against `default` (0 when the variants compute the same).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch

from llamapy.cli.bench import BenchSettings, BenchTest, EngineBench
from llamapy.layers.attention import AttentionMetadata
from llamapy.models import cpu_compile, cpu_step

VARIANTS = (
    "native", "native-t1", "native-t2", "default", "asserts", "cpp", "stack", "stack-cpp",
    "inductor-attn",
)  # fmt: skip


def _stack_step(layers, h, residual, cos_sins, meta, kvs):
    for layer, cos_sin, kv in zip(layers, cos_sins, kvs, strict=True):
        h, residual = layer(h, residual, cos_sin, meta, kv)
    return h, residual


class _Variant(cpu_compile.CompiledDecode):
    """CompiledDecode with other Inductor options, or with all layers in one graph."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.stack = name, name.startswith("stack")
        self.options = dict(cpu_compile.INDUCTOR_OPTIONS)
        if name == "asserts":
            self.options.update(size_asserts=True, scalar_asserts=True, alignment_asserts=True)
        if name in ("cpp", "stack-cpp"):
            self.options["cpp_wrapper"] = True
        self._stacked = None

    def _step_for(self, layer):
        step = self._by_layer.get(id(layer))
        if step is None:
            key = cpu_compile.layer_signature(layer)
            if key not in self._steps:
                code = cpu_compile._layer_step.__code__
                code = code.replace(co_name=f"_layer_step_{self.name}_{len(self._steps)}")
                fn = types.FunctionType(code, cpu_compile._layer_step.__globals__)
                self._steps[key] = torch.compile(fn, options=self.options)
            step = self._by_layer[id(layer)] = self._steps[key]
        return step

    def __call__(self, layers, x, cos_sin_per_layer, meta, kv_caches):
        if not self.stack:
            return super().__call__(layers, x, cos_sin_per_layer, meta, kv_caches)
        if self._stacked is None:
            code = _stack_step.__code__.replace(co_name=f"_stack_step_{self.name}")
            fn = types.FunctionType(code, _stack_step.__globals__)
            self._stacked = torch.compile(fn, options=self.options)
        dense = cpu_compile.dense_decode_metadata(meta)
        h, residual = self._stacked(
            tuple(layers), x, torch.zeros_like(x), tuple(cos_sin_per_layer), dense,
            tuple(kv_caches),
        )  # fmt: skip
        return residual + h


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("--variants", default="native,default")
    args = ap.parse_args()
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.ctx < 1 or args.reps < 1 or args.threads < 1:
        ap.error("--ctx, --reps and --threads must be >= 1")
    bench = EngineBench(args.model, BenchSettings(n_threads=args.threads), [BenchTest(0, 16)])
    runner = bench.llm.engine.runner
    model, block = runner.model, runner.block_size
    scratch = runner.kv_caches[0][0].shape[0] - 1  # padded rows' block: writes go there
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([scratch * block]),
        block_tables=torch.full((1, -(-args.ctx // block)), scratch, dtype=torch.int32),
        seq_lens=torch.tensor([args.ctx], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        max_query_len=1,
        max_seq_len=args.ctx,
        seq_lens_host=(args.ctx,),
        query_start_loc_host=(0, 1),
    )
    ids, positions = torch.tensor([17]), torch.tensor([args.ctx - 1])

    def step() -> torch.Tensor:
        return model.compute_logits(model(ids, positions, meta, runner.kv_caches))

    def make(name: str):
        if not name.startswith("native"):
            return _Variant(name)
        native = cpu_step.NativeDecode.build(model)
        if native is None:
            ap.error(f"{name}: this model cannot take the native step (see models/cpu_step.py)")
        keys = {"native-t1": 1 << 62, "native-t2": 0}.get(name)
        if keys is not None:
            native.attn_parallel_min_keys = keys
        return native

    def use(variant) -> None:
        native = isinstance(variant, cpu_step.NativeDecode)
        model.native_decode = variant if native else None
        model.compiled_decode = None if native else variant

    variants = {n: make(n) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        logits = {}
        for name, variant in variants.items():
            use(variant)
            t0 = time.perf_counter()
            switch = os.environ.get("LLAMAPY_CPU_ATTENTION")
            if name == "inductor-attn":  # read when the layers are traced: this first step
                os.environ["LLAMAPY_CPU_ATTENTION"] = "0"
            try:
                logits[name] = step()
            finally:
                if switch is None:
                    os.environ.pop("LLAMAPY_CPU_ATTENTION", None)
                else:
                    os.environ["LLAMAPY_CPU_ATTENTION"] = switch
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for _ in range(args.reps):
            for name, variant in variants.items():
                use(variant)
                t0 = time.perf_counter()
                for _ in range(10):
                    step()
                times[name].append((time.perf_counter() - t0) / 10 * 1e3)
    first = logits[names[0]]
    print(f"{args.model}, {args.ctx} keys, {args.threads} threads: ms per step")
    print(f"| variant | min | p25 | median | max logit diff vs {names[0]} |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in names:
        t = sorted(times[name])
        diff = (logits[name] - first).abs().max().item()
        print(f"| {name} | {t[0]:.2f} | {t[len(t) // 4]:.2f} | {statistics.median(t):.2f} "
              f"| {diff:.3g} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
