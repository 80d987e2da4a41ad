#!/usr/bin/env python
"""`llamapy quantize` against llama.cpp's llama_model_quantize: the same F16 file quantized
by both, their sizes, time, how many tensors are byte-identical, and the perplexity of each
as llama.cpp measures it (llama-cpp-python logits, llama-perplexity's method).

    python benchmarks/quantize_compare.py                      # smollm2-135m, Q4_K_M
    python benchmarks/quantize_compare.py --type Q4_0 --chunks 8 --threads 2

Steps: the model (default the cached SmolLM2 Q4_1 GGUF) is written as F16 by llamapy (the
dequantized weights: `llamapy quantize IN OUT F16`); that F16 file is quantized to TYPE by
llamapy and by llama.cpp (`llama_model_quantize`, `nthread` = --threads); each of the three
files is loaded in llama.cpp, which scores the same chunks of text. Text: CPython's
Lib/pydoc_data/topics.py (the Language Reference, as scripts/make_fidelity_refs.py uses).
Perplexity per chunk of N_CTX tokens (the first replaced by BOS), over its second half
(llama-perplexity's `first = n_ctx / 2`).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

N_CTX = 512


def reference_text(chars: int) -> str:
    from pydoc_data.topics import topics

    parts, size = [], 0
    for key in sorted(topics):
        parts.append(topics[key])
        size += len(topics[key]) + 2
        if size >= chars:
            break
    return "\n\n".join(parts)


def _silence_llama_cpp() -> None:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _quiet(level, text, user_data):  # noqa: ARG001
        return None

    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
    _silence_llama_cpp.keep = _quiet  # the callback must outlive this call


def llama_cpp_quantize(src: Path, dst: Path, ftype: int, threads: int) -> tuple[float, float]:
    """(wall, CPU) seconds of llama_model_quantize."""
    from llama_cpp import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    t0, c0 = time.perf_counter(), time.process_time()
    if L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)):
        raise RuntimeError("llama_model_quantize failed")
    return time.perf_counter() - t0, time.process_time() - c0


def perplexity(path: Path, text: str, n_chunks: int, threads: int) -> tuple[float, float]:
    """(ppl, stderr of the mean NLL scaled to ppl) over n_chunks chunks of N_CTX tokens."""
    import llama_cpp

    lm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_ubatch=N_CTX,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )
    ids = lm.tokenize(text.encode(), add_bos=False, special=False)
    if len(ids) < n_chunks * N_CTX:
        raise SystemExit(f"text gives {len(ids)} tokens; {n_chunks * N_CTX} needed")
    bos = lm.token_bos()
    nll: list[float] = []
    first = N_CTX // 2
    for c in range(n_chunks):
        chunk = ids[c * N_CTX : (c + 1) * N_CTX]
        chunk[0] = bos
        lm.reset()
        lm.eval(chunk)
        logits = torch.from_numpy(np.array(lm.scores[:N_CTX], dtype=np.float32)).double()
        logp = torch.log_softmax(logits[first : N_CTX - 1], dim=-1)
        target = torch.tensor(chunk[first + 1 : N_CTX])
        nll += (-logp.gather(1, target[:, None])[:, 0]).tolist()
    arr = np.array(nll)
    mean = arr.mean()
    stderr = arr.std(ddof=1) / math.sqrt(len(arr))
    return math.exp(mean), math.exp(mean) * stderr


def identical_tensors(a: Path, b: Path) -> tuple[int, int, int]:
    """(byte-identical tensors, same-type tensors, all tensors) of two GGUF files."""
    from llamapy.formats.gguf_file import GGUFFile

    fa, fb = GGUFFile(a), GGUFFile(b)
    same = equal = 0
    for name, info in fa.tensor_infos.items():
        other = fb.tensor_infos.get(name)
        if other is None or other.qtype != info.qtype:
            continue
        same += 1
        equal += bool(torch.equal(fa.raw(name), fb.raw(name)))
    return equal, same, len(fa.tensor_infos)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="GGUF path or alias")
    p.add_argument("--type", default="Q4_K_M", help="llamapy quantize type")
    p.add_argument("--chunks", type=int, default=4, help=f"chunks of {N_CTX} tokens")
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    p.add_argument("--workdir", default=None, help="keep the files here (default: temp dir)")
    args = p.parse_args()

    from llamapy.convert.quantize_model import quantize_model
    from llamapy.convert.source import gguf_source
    from llamapy.hub import resolve_model
    from llamapy.quant.presets import QuantOptions, parse_preset

    torch.set_num_threads(args.threads)
    _silence_llama_cpp()
    preset = parse_preset(args.type)
    src = resolve_model(args.model).path
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        f16, ours, ref = work / "f16.gguf", work / "llamapy.gguf", work / "llama_cpp.gguf"

        def ours_quantize(inp: Path, out: Path, name: str):
            source = gguf_source(inp)
            c0 = time.process_time()
            try:
                return quantize_model(source, out, QuantOptions(parse_preset(name)))
            finally:
                source.close()
                cpu[name] = time.process_time() - c0

        cpu: dict[str, float] = {}

        s16 = ours_quantize(src, f16, "F16")
        s = ours_quantize(f16, ours, preset.name)
        t_ref, cpu_ref = llama_cpp_quantize(f16, ref, int(preset.ftype), args.threads)
        equal, same, total = identical_tensors(ours, ref)
        text = reference_text(4 * N_CTX * args.chunks)
        rows = []
        for label, path in (("F16", f16), (f"llamapy {preset.name}", ours),
                            (f"llama.cpp {preset.name}", ref)):  # fmt: skip
            ppl, err = perplexity(path, text, args.chunks, args.threads)
            rows.append((label, path.stat().st_size, ppl, err))
    print(f"\ntensors: {equal} of {total} byte-identical ({same} of the same type)")
    print(
        f"quantize time ({args.threads} threads), wall: llamapy {s.seconds:.2f} s, llama.cpp "
        f"{t_ref:.2f} s ({s.seconds / t_ref:.1f}x); CPU: llamapy {cpu[preset.name]:.2f} s, "
        f"llama.cpp {cpu_ref:.2f} s ({cpu[preset.name] / cpu_ref:.1f}x)"
    )
    print(f"F16 from {src.name}: {s16.seconds:.2f} s wall, {cpu['F16']:.2f} s CPU")
    print(f"\nperplexity, llama.cpp logits, {args.chunks} x {N_CTX} tokens (topics.py)")
    print("| file | size MiB | ppl | +- |")
    print("| --- | ---: | ---: | ---: |")
    for label, size, ppl, err in rows:
        print(f"| {label} | {size / 2**20:.2f} | {ppl:.4f} | {err:.4f} |")
    rel = rows[1][2] / rows[2][2] - 1
    print(f"\nllamapy / llama.cpp perplexity - 1: {rel * 100:+.3f}% (criterion: within 1%)")
    return 0 if abs(rel) <= 0.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
