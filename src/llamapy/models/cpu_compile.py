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

import contextlib
import dataclasses
import logging
import os
import shutil
import types
import warnings
from collections.abc import Callable

import torch

from llamapy.kernels.cpu.switches import switched_off, switched_on
from llamapy.layers.attention import AttentionMetadata

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
        self._checked: set[tuple] = set()  # call kinds that ran once with every guard
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
        kind = _call_kind(x, kv_caches)
        stance = _skip_guards() if kind in self._checked else contextlib.nullcontext()
        try:
            with stance:
                for layer, cos_sin, kv in zip(layers, cos_sin_per_layer, kv_caches, strict=True):
                    x, residual = self._step_for(layer)(layer, x, residual, cos_sin, dense, kv)
            self._checked.add(kind)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to eager
            self.failed = True
            log.warning(
                "compiling the CPU decode step failed (%s: %s); decoding eagerly",
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            return None
        return residual + x


def _call_kind(x: torch.Tensor, kv_caches: list[KVCache]) -> tuple:
    """What may differ between two calls of one model's compiled steps: the batch size
    (torch specializes 1, and compiles 2 statically before it makes it dynamic), the
    autograd modes, the activations' dtype, the KV cache's geometry (an engine allocates
    one; another caller could pass its own). Everything else a guard checks is fixed per
    model: the layers of one step share their tensors' shapes and dtypes (`layer_signature`),
    the metadata is normalized (`dense_decode_metadata`, the block tables' width dynamic
    from the first call)."""
    caches = tuple((k.shape, k.dtype, v.shape, v.dtype) for k, v in kv_caches)
    grad = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    return (x.shape[0], x.dtype, grad, caches)


# Once a kind of call has run with every guard checked (compiling what it needed), its
# later calls check only the guards that tell the compiled graphs apart (torch's
# `skip_guard_eval_unsafe`: "unsafe" where inputs may change in ways no differentiating
# guard covers, which `_call_kind` rules out here). Dynamo's full guard set over a layer's
# weights cost ~30 us a layer call: ~0.9 ms of a ~8.5 ms SmolLM2 token (tg64 114-117 ->
# 126 t/s on this machine). LLAMAPY_CPU_GUARDS=1 checks every guard on every call.
def _skip_guards() -> contextlib.AbstractContextManager:
    if switched_on("LLAMAPY_CPU_GUARDS"):
        return contextlib.nullcontext()
    # constructed here, not once: constructing it sets the stance (until its exit)
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


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
