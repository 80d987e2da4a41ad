"""Programmatic dependent launch (`kernels/triton/pdl.py`): where it is on, and that kernels
launched with it compute exactly what they compute without it.

A kernel that read an activation (or wrote anything) before its PDL wait would race with the
kernel before it; the GPU tests chain dependent kernels (each reads what the previous one
wrote) in a CUDA graph, as a decode step does, and compare bit for bit with PDL off. Whole
decode steps with PDL on and off: tests/engine/test_cuda_graphs.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llamapy.kernels.triton as kt
from llamapy.kernels.triton import pdl
from llamapy.quant.types import QuantType

pytestmark = pytest.mark.skipif(not kt.HAS_TRITON, reason="triton is not installed")

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def test_off_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not pdl.pdl_enabled(torch.device("cpu"))
    assert pdl.launch_options(False) == {"PDL": False}
    assert pdl.launch_options(True) == {"PDL": True, "launch_pdl": True}
    pdl.set_model_bytes(torch.device("cpu"), 1)  # recorded for CUDA devices only
    assert not pdl.pdl_enabled(torch.device("cpu"))
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        can = ON_HOPPER and not kt.INTERPRET
        monkeypatch.setattr(pdl, "_model_bytes", {})
        monkeypatch.delenv("LLAMAPY_PDL", raising=False)
        assert not pdl.pdl_enabled(cuda)  # no model recorded: off
        pdl.set_model_bytes(cuda, 100 << 20)
        assert pdl.pdl_enabled(cuda) == can
        pdl.set_model_bytes(cuda, 700 << 20)
        assert pdl.pdl_enabled(cuda) == can  # a kernel without a weight
        assert not pdl.pdl_enabled(cuda, pdl.AUTO_MAX_WEIGHT_BYTES + 1)
        monkeypatch.setenv("LLAMAPY_PDL", "1")
        assert pdl.pdl_enabled(cuda, pdl.AUTO_MAX_WEIGHT_BYTES + 1) == can
        pdl.set_model_bytes(cuda, 100 << 20)
        monkeypatch.setenv("LLAMAPY_PDL", "0")
        assert not pdl.pdl_enabled(cuda)


def test_trigger_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A product launched without PDL may still let the next kernel launch early: compiled
    with its wait and launch_dependents, without the launch flag; by default at K below
    TRIGGER_MAX_K (not the downs), only where PDL runs at all."""
    assert pdl.launch_options(False, trigger=True) == {"PDL": True}
    assert pdl.launch_options(True, trigger=True) == {"PDL": True, "launch_pdl": True}
    assert pdl.launch_options(True, trigger=False) == {"PDL": True, "launch_pdl": True}
    short, long = pdl.TRIGGER_MAX_K - 1, pdl.TRIGGER_MAX_K
    assert short >= 2048 and long <= 8192, "the 1B's QKV / o / gate_up yes, its down no"
    for env in (None, ""):
        assert pdl.trigger_wanted(env, short) and not pdl.trigger_wanted(env, long)
    assert pdl.trigger_wanted("all", long) and pdl.trigger_wanted(" ALL ", short)
    assert not pdl.trigger_wanted("0", short) and not pdl.trigger_wanted("0", long)
    monkeypatch.delenv(pdl.TRIGGER_SWITCH, raising=False)
    assert not pdl.trigger_enabled(torch.device("cpu"), short)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        monkeypatch.setattr(pdl, "_model_bytes", {})
        monkeypatch.delenv("LLAMAPY_PDL", raising=False)
        assert not pdl.trigger_enabled(cuda, short)  # no model recorded: no PDL at all
        pdl.set_model_bytes(cuda, 700 << 20)
        assert pdl.trigger_enabled(cuda, short) == (ON_HOPPER and not kt.INTERPRET)
        assert not pdl.trigger_enabled(cuda, long)
        monkeypatch.setenv("LLAMAPY_PDL", "0")
        assert not pdl.trigger_enabled(cuda, short)


def test_trigger_setting_names_a_bad_value(caplog: pytest.LogCaptureFixture) -> None:
    """LLAMAPY_GPU_PDL_TRIGGER: 0 or all (any case); anything else keeps the K rule with a
    warning naming the variable."""
    pdl.trigger_setting.cache_clear()
    assert [pdl.trigger_setting(v) for v in (None, "", " ALL ", "0")] == ["", "", "all", "0"]
    assert not caplog.records
    assert pdl.trigger_setting("late") == ""  # a lab value, measured and removed
    assert "LLAMAPY_GPU_PDL_TRIGGER='late'" in caplog.text
    assert pdl.trigger_setting("yes") == ""
    assert "LLAMAPY_GPU_PDL_TRIGGER='yes'" in caplog.text
    assert pdl.trigger_wanted("yes", pdl.TRIGGER_MAX_K - 1)
    assert not pdl.trigger_wanted("yes", pdl.TRIGGER_MAX_K)


def test_policy() -> None:
    """LLAMAPY_PDL forces it; unset (or anything else) it follows the model's size and, in a
    large model, the size of the kernel's weight."""
    small, large = pdl.AUTO_MAX_MODEL_BYTES, pdl.AUTO_MAX_MODEL_BYTES + 1
    light, heavy = pdl.AUTO_MAX_WEIGHT_BYTES, pdl.AUTO_MAX_WEIGHT_BYTES + 1
    for env in (None, "", "yes"):
        assert pdl.wanted(env, small) and pdl.wanted(env, small, heavy)
        assert pdl.wanted(env, large) and pdl.wanted(env, large, light)
        assert not pdl.wanted(env, large, heavy)
        assert not pdl.wanted(env, None) and not pdl.wanted(env, None, light)
    assert pdl.wanted("1", large, heavy) and pdl.wanted("1", None)
    assert not pdl.wanted("0", small) and not pdl.wanted("0", large, light)
    assert 150 << 20 <= pdl.AUTO_MAX_MODEL_BYTES < 700 << 20, "SmolLM2 files all on, not the 1B's"
    # the 1B shape's Q4_0 attention projections (2.4, 3.5 MB) and Q8_0 ones (4.5, 6.7 MB) on,
    # its Q4_0 MLP matrices (9.4, 18.9 MB) off
    assert 6_684_672 <= pdl.AUTO_MAX_WEIGHT_BYTES < 9_437_184


def test_max_weight_setting(caplog: pytest.LogCaptureFixture) -> None:
    """LLAMAPY_PDL_MAX_WEIGHT_MIB: the size rule's bound in MiB; anything but a positive
    integer keeps the default with a warning naming the variable."""
    parse = pdl._max_weight_bytes
    assert parse(None) == parse("") == parse(" 8 ") == 8 << 20
    assert parse("4") == 4 << 20
    assert not caplog.records
    assert parse("0") == parse("big") == parse("-8") == 8 << 20
    assert "LLAMAPY_PDL_MAX_WEIGHT_MIB='big'" in caplog.text


def test_prefetch_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pdl.prefetch_lines(0) == 0
    assert pdl.prefetch_lines(1) == 1
    assert pdl.prefetch_lines(128) == 1
    assert pdl.prefetch_lines(129) == 2
    assert pdl.prefetch_lines(3 * 128) == 4  # a power of two (a constexpr tile width)
    assert pdl.prefetch_lines(1 << 20) == 64  # capped: longer runs are prefetched in part
    assert pdl.prefetch_lines(1 << 20, cap=8) == 8
    monkeypatch.setattr(pdl, "PREFETCH", False)
    assert pdl.prefetch_lines(4096) == 0


def _chain(x, layers, eps=1e-5):
    """A decode step's kernel sequence: per layer a normed GEMV, a residual GEMV, a normed
    gate_up GEMV and the activated down GEMV into the residual; every kernel reads the
    previous one's output."""
    from llamapy.kernels.triton import qmatmul as qm

    stream = x.clone()
    for g, w_in, w_out, w_gu, w_down in layers:
        h = qm.qmatmul(stream, w_in, norm_weight=g, eps=eps)
        qm.qmatmul(h, w_out, residual=stream)
        gu = qm.qmatmul(stream, w_gu, norm_weight=g, eps=eps)
        qm.qmatmul(gu, w_down, act="silu", residual=stream)
    return stream


def _layers(rng: np.random.Generator, qtype: QuantType, d: int, ffn: int, n: int):
    from llamapy.kernels.triton import qmatmul as qm
    from llamapy.quant.quantize import quantize

    def weight(rows: int, cols: int):
        w = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
        return qm.pack_weight(quantize(w.cuda(), qtype), qtype, (rows, cols))

    layers = []
    for _ in range(n):
        g = torch.from_numpy(rng.uniform(0.5, 1.5, d).astype(np.float32)).cuda()
        layers.append((g, weight(d, d), weight(d, d), weight(2 * ffn, d), weight(d, ffn)))
    return layers


def _pdl_mode(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PDL for `mode`: "0" / "1" LLAMAPY_PDL off / on for every kernel; "trigger" the policy
    of a large model (its 9-19 MB MLP weights launched without PDL) with
    LLAMAPY_GPU_PDL_TRIGGER=all, so that the kernel after each of those still launches
    early."""
    monkeypatch.delenv(pdl.TRIGGER_SWITCH, raising=False)
    if mode == "trigger":
        monkeypatch.delenv("LLAMAPY_PDL", raising=False)
        monkeypatch.setattr(pdl, "_model_bytes", {})
        pdl.set_model_bytes(torch.device("cuda"), pdl.AUTO_MAX_MODEL_BYTES + 1)
        monkeypatch.setenv(pdl.TRIGGER_SWITCH, "all")
    else:
        monkeypatch.setenv("LLAMAPY_PDL", mode)


@pytest.mark.skipif(not ON_HOPPER, reason="PDL needs a Hopper (sm_90) or newer GPU")
@pytest.mark.parametrize("qtype", [QuantType.Q4_0, QuantType.Q8_0, QuantType.Q4_K])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("mode", ["1", "trigger"])
def test_graph_chain_matches_pdl_off(qtype, m, mode, rng, monkeypatch) -> None:
    """Real decode widths (2048, ffn 8192: split-K for the down projection), 4 layers in a
    CUDA graph, replayed on fresh inputs: identical with PDL on (`mode`) and off."""
    layers = _layers(rng, qtype, 2048, 8192, 4)
    x = torch.from_numpy(rng.standard_normal((m, 2048), dtype=np.float32)).cuda()
    results = {}
    for on in ("0", mode):
        _pdl_mode(on, monkeypatch)
        _chain(x, layers)  # compiles before capture
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(graph):
            y = _chain(static_x, layers)
        outs = []
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            outs.append((static_x.clone(), y.clone()))
        torch.cuda.synchronize()
        results[on] = outs
    # eager with PDL off is the reference for each replay's inputs
    _pdl_mode("0", monkeypatch)
    for (x_off, y_off), (x_on, y_on) in zip(results["0"], results[mode], strict=True):
        assert torch.isfinite(y_on).all()
        assert torch.equal(_chain(x_on, layers), y_on)
        assert torch.equal(_chain(x_off, layers), y_off)


def test_dependents_launch_after_the_wait() -> None:
    """In every Triton kernel that takes part in PDL, `launch_dependents` comes after `wait`:
    a grid lets the next one launch only once its own predecessor has finished, so at most
    one grid waits ahead of the running one (triggering first left chains of early grids on
    the SMs: benchmarks/RESULTS.md, eighteenth session). Read from the kernels' source."""
    import ast
    from pathlib import Path

    kernels = 0
    for path in sorted(Path(kt.__file__).parent.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            calls = sorted(
                (node.lineno, node.col_offset, node.func.attr)
                for node in ast.walk(fn)
                if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "pdl"
                and node.func.attr in ("wait", "launch_dependents")
            )
            if not calls:
                continue
            kernels += 1
            order = [attr for _, _, attr in calls]
            assert order == ["wait", "launch_dependents"], f"{path.name}:{fn.name}: {order}"
    assert kernels >= 12, kernels
