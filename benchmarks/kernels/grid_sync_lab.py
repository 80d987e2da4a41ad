"""Lab (issue 6): what a grid-wide step costs, as a kernel boundary or as a barrier inside one
persistent kernel.

The 1B's decode step is seven dependent kernels a layer, each at a latency floor well above
its bytes (benchmarks/RESULTS.md, thirty-fifth session's profile). A persistent "megakernel"
would replace the kernel boundaries by grid barriers. Whether that can pay depends on what a
barrier costs against a boundary in a CUDA graph (with and without PDL). This lab times the
same dependent chain three ways, each stage a tiny exchange (every program reads the row
another program wrote in the stage before, adds one, writes its own), so that the stage's
own work is a few hundred ns and the rest is synchronization:

- `launch`: one launch a stage, STAGES launches captured in a CUDA graph, without PDL;
- `pdl`: the same with programmatic dependent launch (each kernel waits for the one before,
  then lets the next one launch);
- `barrier`: one persistent launch (one program an SM, or P an SM) running every stage, a
  grid barrier between stages (a release atomic on a monotonic counter, then polling it
  until every program of the stage has arrived: with acquire atomics, or volatile loads).

Each way's result is checked first (program p's row after S stages is the initial row of
program p + S, plus S), then timed. (The thirty-fifth session's figures were taken before the
CTA barrier ahead of each release was added: Triton makes a scalar atomic from one thread,
whose release does not order the other warps' stores without it. The checks passed without
it; it adds one barrier a stage, which only makes the barrier ways slower.) GPU only: the
barrier spins on other programs, which the interpreter runs one after another.

    python benchmarks/kernels/grid_sync_lab.py [--stages 512] [--per-sm 1,2] [--width 128]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from llamapy.kernels.triton import pdl


@triton.jit
def _stage_kernel(src_ptr, dst_ptr, NPROG, WIDTH: tl.constexpr, PDL: tl.constexpr):
    """One stage: dst[p] = src[(p + 1) % NPROG] + 1."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    pid = tl.program_id(0)
    offs = tl.arange(0, WIDTH)
    v = tl.load(src_ptr + ((pid + 1) % NPROG) * WIDTH + offs)
    tl.store(dst_ptr + pid * WIDTH + offs, v + 1.0)


@triton.jit
def _barrier_kernel(buf_ptr, cnt_ptr, stages, WIDTH: tl.constexpr, POLL_ATOMIC: tl.constexpr):
    """Every stage in one launch: buf holds two (NPROG, WIDTH) row sets, read from one and
    written to the other in turn; a grid barrier after each stage (the counter counts
    arrivals over the whole launch: stage s is done at (s + 1) * NPROG). POLL_ATOMIC: poll
    with acquire atomics (the PTX memory model's way); else with volatile loads (an acquire
    atomic whose result is unused is compiled away, so none follows them: the rows are read
    volatile, past L1, and the check says whether that held)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, WIDTH)
    for s in range(stages):
        src = buf_ptr + (s % 2) * nprog * WIDTH
        dst = buf_ptr + ((s + 1) % 2) * nprog * WIDTH
        v = tl.load(src + ((pid + 1) % nprog) * WIDTH + offs, volatile=True)
        tl.store(dst + pid * WIDTH + offs, v + 1.0)
        # one thread makes the release: its warps' stores must come before it (a CTA barrier)
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
        target = (s + 1) * nprog
        if POLL_ATOMIC:
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
            while seen < target:
                seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        else:
            seen = tl.load(cnt_ptr, volatile=True)
            while seen < target:
                seen = tl.load(cnt_ptr, volatile=True)


def expected(init: torch.Tensor, stages: int) -> torch.Tensor:
    return torch.roll(init, shifts=-stages, dims=0) + stages


def run_launches(init: torch.Tensor, stages: int, pdl_on: bool) -> tuple[torch.Tensor, float]:
    """(the rows after `stages` launches, us a stage) from a CUDA graph of the launches."""
    nprog, width = init.shape
    bufs = [init.clone(), torch.empty_like(init)]

    def chain() -> None:
        for s in range(stages):
            _stage_kernel[(nprog,)](
                bufs[s % 2], bufs[(s + 1) % 2], nprog, WIDTH=width,
                **pdl.launch_options(pdl_on), num_warps=4,
            )  # fmt: skip

    chain()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    bufs[0].copy_(init)
    graph.replay()
    torch.cuda.synchronize()
    result = bufs[stages % 2].clone()
    return result, _time(graph.replay) / stages


def run_barrier(init: torch.Tensor, stages: int, atomic: bool) -> tuple[torch.Tensor, float]:
    nprog, width = init.shape
    buf = torch.empty(2, nprog, width, device=init.device)
    cnt = torch.zeros(1, dtype=torch.int32, device=init.device)

    def once() -> None:
        buf[0].copy_(init)
        cnt.zero_()
        _barrier_kernel[(nprog,)](buf, cnt, stages, WIDTH=width, POLL_ATOMIC=atomic, num_warps=4)

    once()
    torch.cuda.synchronize()
    result = buf[stages % 2].clone()
    # the copy and the zeroing are two tiny launches: timed apart and taken off
    setup = _time(lambda: (buf[0].copy_(init), cnt.zero_()))
    return result, (_time(once) - setup) / stages


def _time(fn, reps: int = 20) -> float:
    """Microseconds a call (events around `reps` calls, after one warm call)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=512)
    ap.add_argument(
        "--per-sm", default="1,2", help="programs an SM (the barrier needs all resident)"
    )
    ap.add_argument("--width", type=int, default=128, help="floats a program exchanges")
    args = ap.parse_args()
    if args.stages < 1:
        ap.error("--stages must be >= 1")
    try:
        per_sm_values = [int(v) for v in args.per_sm.split(",")]
    except ValueError:
        ap.error(f"--per-sm takes integers like 1,2, got {args.per_sm!r}")
    if any(v < 1 for v in per_sm_values):
        ap.error(f"--per-sm takes positive integers, got {args.per_sm!r}")
    if args.width < 1 or args.width & (args.width - 1):
        ap.error(f"--width must be a power of two, got {args.width}")
    if not torch.cuda.is_available():
        ap.error("a GPU is needed (the barrier spins on programs the interpreter runs in turn)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)}, {sms} SMs, {args.stages} stages")
    print("| programs | way | us a stage |")
    print("| ---: | --- | ---: |")
    for per_sm in per_sm_values:
        nprog = sms * per_sm
        # whole numbers: adding one S times is exact, as adding S is
        init = torch.randint(-1000, 1000, (nprog, args.width), device="cuda").float()
        want = expected(init, args.stages)
        ways = {
            "launch": lambda i=init: run_launches(i, args.stages, False),
            "pdl": lambda i=init: run_launches(i, args.stages, True),
            "barrier (atomic polls)": lambda i=init: run_barrier(i, args.stages, True),
            "barrier (volatile polls)": lambda i=init: run_barrier(i, args.stages, False),
        }
        for name, way in ways.items():
            got, us = way()
            ok = torch.equal(got, want)
            print(f"| {nprog} | {name} | {us:.2f}{'' if ok else ' (WRONG RESULT)'} |", flush=True)


if __name__ == "__main__":
    main()
