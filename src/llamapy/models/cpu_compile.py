"""The CPU decode step through `torch.compile` (Inductor's C++ code generation).

Eagerly, a decode step of a small model is a few hundred tiny ATen calls per token, each
costing microseconds of dispatch around nanoseconds of work (benchmarks/RESULTS.md, issue 7).
Compiled, the norms, residual adds, rope, KV writes, attention and activations between the
int4 matmuls become a few fused C++ loops per layer.

One decoder layer is compiled, not the whole model: layers of the same shapes and weight
types share one graph (SmolLM2: one for all 30; Gemma 3 Q4_K_M: four, from its sliding and
global layers and its mixed weight types), and compilation takes seconds, not minutes. The
traced layer reads the KV cache through `decode_attention_dense` (shape-static, the block
table's width the only dynamic size), never through the host copies of the metadata, so a
new sequence length does not recompile. The graphs for one sequence are compiled at load
(`ModelRunner.compile_decode`); those for several (torch specializes sizes 0 and 1: every
larger batch shares one graph) at the first batched decode step. Inductor caches them on
disk across processes.

Only decode-only batches (one new token per sequence) take this path; prefill is matmul-
bound and stays eager. `LLAMAPY_CPU_COMPILE=0` / `enforce_eager=True` / `--enforce-eager`
turn it off; a compilation failure (no C++ compiler, say) logs one warning and falls back to
the eager step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import types
import warnings
from collections.abc import Callable

import torch

from llamapy.layers.attention import AttentionMetadata
from llamapy.switches import switched_off, switched_on

log = logging.getLogger(__name__)

# Inductor notes each fused loop that mixes bf16 (int4 matmul inputs) and fp16 values; it is
# a performance remark about its own code generation, not something a user can act on.
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")

KVCache = tuple[torch.Tensor, torch.Tensor]


def compile_enabled_by_default() -> bool:
    """`LLAMAPY_CPU_COMPILE` (default on) and a C++ compiler on the PATH for Inductor."""
    if switched_off("LLAMAPY_CPU_COMPILE"):
        return False
    return compiler_available()


def compiler_available() -> bool:
    return any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


# The fused loops between the matmuls touch a few thousand floats: single-threaded, they cost
# the same on an idle machine as with OpenMP (measured), and no fork/join waits on a core that
# another process holds; the int4 matmuls (ATen) keep torch's thread count. (A C++ wrapper,
# `cpp_wrapper`, measured no faster and compiles slower.) The generated wrapper's checks of
# its inputs' sizes, strides, scalars and alignment repeat what dynamo's guards already
# checked before the call: off, they save ~0.4 ms per SmolLM2 token (10.43 -> 10.03 ms, one
# decode step at 128 keys; Gemma 3 19.07 -> 18.73 ms).
INDUCTOR_OPTIONS = {
    # keep eager's roundings of low-precision casts: the 8-bit quantization of matmul inputs
    # (kernels/cpu/vnni.py) rounds each block's scale to fp16 as llama.cpp does; by default
    # Inductor drops a float32 -> float16 -> float32 round trip
    "emulate_precision_casts": True,
    "cpp.threads": 1,
    "size_asserts": False,
    "scalar_asserts": False,
    "alignment_asserts": False,
}


def _layer_step(
    layer: torch.nn.Module,
    h: torch.Tensor,
    residual: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    kv_cache: KVCache,
) -> tuple[torch.Tensor, torch.Tensor]:
    return layer(h, residual, cos_sin, meta, kv_cache)


class CompiledDecode:
    """Runs a decoder's layers for a decode-only batch through one compiled layer step."""

    # Graphs one model may need: one per distinct layer (weight types differ between the
    # layers of mixed files such as Q4_K_M; Gemma 3 alternates sliding and global layers),
    # times two batch shapes. Past dynamo's default of 8, layers would silently run eagerly.
    RECOMPILE_LIMIT = 128

    def __init__(self) -> None:
        import torch._dynamo.config

        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, self.RECOMPILE_LIMIT)
        # one compiled step per kind of layer, each over its own code object: dynamo keeps
        # its graphs per code object and tries their guards in turn on every call
        self._steps: dict[tuple, Callable] = {}
        self._by_layer: dict[int, Callable] = {}  # layers live as long as their model
        # per (layer, call kind): the compiled code itself, once a guarded call chose it
        self._direct: dict[tuple[int, tuple], Callable] = {}
        self.failed = False

    def _step_for(self, layer: torch.nn.Module) -> Callable:
        step = self._by_layer.get(id(layer))  # the signature walk costs ~0.2 ms: once
        if step is not None:
            return step
        key = layer_signature(layer)
        step = self._steps.get(key)
        if step is None:
            code = _layer_step.__code__.replace(co_name=f"_layer_step_{len(self._steps)}")
            fn = types.FunctionType(code, _layer_step.__globals__, code.co_name)
            step = self._steps[key] = torch.compile(fn, dynamic=None, options=INDUCTOR_OPTIONS)
        self._by_layer[id(layer)] = step
        return step

    @staticmethod
    def applies(meta: AttentionMetadata) -> bool:
        return meta.max_query_len == 1

    def __call__(
        self,
        layers: torch.nn.ModuleList,
        x: torch.Tensor,
        cos_sin_per_layer: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
    ) -> torch.Tensor | None:
        """The final hidden states (T, hidden) of the layers from the embeddings `x`, or None
        when compilation failed (the caller then runs the eager step)."""
        if self.failed:
            return None
        dense = dense_decode_metadata(meta)
        residual = torch.zeros_like(x)  # 0 + x == x: layer 0 takes the same graph
        kind = _call_kind(x, kv_caches, dense)
        guarded = switched_on("LLAMAPY_CPU_GUARDS")
        try:
            for layer, cos_sin, kv in zip(layers, cos_sin_per_layer, kv_caches, strict=True):
                args = (layer, x, residual, cos_sin, dense, kv)
                direct = None if guarded else self._direct.get((id(layer), kind))
                if direct is not None:
                    x, residual = direct(*args)
                    continue
                step = self._step_for(layer)
                x, residual = step(*args)  # every guard checked; compiles what it lacks
                if not guarded and (found := _compiled_code_for(step, args)) is not None:
                    self._direct[(id(layer), kind)] = found
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to eager
            self.failed = True
            log.warning(
                "compiling the CPU decode step failed (%s: %s); decoding eagerly",
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            return None
        return residual + x


def _call_kind(x: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata) -> tuple:
    """What may differ between two calls of one model's compiled steps: the batch size
    (torch specializes 1, and compiles 2 statically before it makes it dynamic), the
    autograd modes, the activations' dtype, the KV cache's geometry (an engine allocates
    one; another caller could pass its own), which side of the attention's width test the
    block tables fall on (`cpu_attention.supports`: a guard, so two graphs). Everything else
    a guard checks is fixed per model: the layers of one step share their tensors' shapes
    and dtypes (`layer_signature`), the metadata is normalized (`dense_decode_metadata`, the
    block tables' width dynamic from the first call)."""
    from llamapy.kernels.cpu.attention import MIN_BLOCKS  # (here: not at every start-up)

    caches = tuple((k.shape, k.dtype, v.shape, v.dtype) for k, v in kv_caches)
    grad = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    wide = meta.block_tables.shape[1] >= MIN_BLOCKS
    return (x.shape[0], x.dtype, grad, caches, wide)


# Once a kind of call has run through dynamo with every guard checked (compiling what it
# needed), its later calls run the code dynamo chose for it directly: the bytecode it
# generated for `_layer_step` (which unpacks the layer's tensors and calls the compiled
# graph), found in dynamo's cache of that code object by the same guards. This is sound
# where no input changes in a way a guard would catch, which `_call_kind` and the one step
# per `layer_signature` rule out. It saves dynamo's cache lookup and compiled-region
# wrappers, ~50 us a layer call by torch.profiler, which torch's `skip_guard_eval_unsafe`
# stance (the previous way: differentiating guards only) still paid: one SmolLM2-135M
# decode step at 128 keys, 7.31 -> 6.07 ms (min of 20 x 10 steps, interleaved in one
# process). LLAMAPY_CPU_GUARDS=1 sends every call through dynamo with every guard.
def _compiled_code_for(step: Callable, args: tuple) -> Callable | None:
    """The function dynamo runs for `step(*args)`: the cache entry of its code object whose
    guards pass on `args`, as a Python function; None if there is none (then calls stay
    guarded)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # pragma: no cover - a torch without it
        return None
    orig = getattr(step, "_torchdynamo_orig_callable", None)
    code = getattr(orig, "__code__", None)
    if code is None:
        return None
    f_locals = dict(zip(code.co_varnames[: code.co_argcount], args, strict=True))
    for entry in _debug_get_cache_entry_list(code):
        if entry.guard_manager.check(f_locals):
            return types.FunctionType(entry.code, orig.__globals__, code.co_name)
    return None


def layer_signature(layer: torch.nn.Module) -> tuple:
    """What makes two layers trace to different graphs: the shapes, dtypes and presence of
    their tensors (weights in any packed form) and their scalar settings."""
    parts: list = []
    for name, module in layer.named_modules():
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or attr == "training":
                continue
            parts.append((name, attr, _describe(value)))
    return tuple(parts)


def _describe(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple((f.name, _describe(getattr(value, f.name))) for f in dataclasses.fields(value))
    if isinstance(value, tuple | list):
        return tuple(_describe(v) for v in value)
    if value is None or isinstance(value, int | float | str | bool):
        return value
    return type(value).__qualname__


def dense_decode_metadata(meta: AttentionMetadata) -> AttentionMetadata:
    """`meta` for `decode_attention_dense`: host copies dropped (their values would become
    constants of the traced graph), the block tables at least 2 wide and marked dynamic
    (torch specializes sizes 0 and 1), so every length shares one graph."""
    tables = meta.block_tables
    if tables.shape[1] < 2:  # the padding column names block 0, masked by seq_lens
        tables = torch.nn.functional.pad(tables, (0, 2 - tables.shape[1]))
    torch._dynamo.mark_dynamic(tables, 1)
    return dataclasses.replace(
        meta,
        block_tables=tables,
        max_seq_len=0,
        seq_lens_host=(),
        query_start_loc_host=(),
        decode_splits=None,
        dense_decode=True,
    )
