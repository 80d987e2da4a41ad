"""The ggml-numerics CPU mode (kernels/cpu/ggml_numerics.py) against independent oracles:
gguf-py's Q8_0 quantizer, numpy transcriptions of ggml's x86 `quantize_row_q8_0` /
`quantize_row_q8_1` and of `quantize_row_q8_K_ref`, a float64 evaluation of ggml's dot-product
formulas, a float64 attention with the same roundings, and, where llama-cpp-python is
installed, llama.cpp's own compiled quantizers, dot products and GELU table (ctypes)."""

from __future__ import annotations

import ctypes
import os

import gguf
import numpy as np
import pytest
import torch

from llamapy.kernels.cpu import ggml_numerics as gn
from llamapy.layers.attention import AttentionMetadata
from llamapy.quant.dequant import dequantize
from llamapy.quant.types import QuantType, type_size

F32 = np.float32


def _activations(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Heavy-tailed float32 rows with some all-zero blocks, like hidden states."""
    x = rng.standard_normal((rows, k)) * rng.exponential(1.0, (rows, k)) ** 2
    x[rng.random((rows, k)) < 0.02] *= 50.0  # outliers
    x[0, :256] = 0.0  # a zero block of every block size
    return x.astype(F32)


# -- numpy transcriptions of the C quantizers -----------------------------------------------


def np_quantize_q8_0_x86(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """arch/x86/quants.c quantize_row_q8_0 (AVX): d = max / 127.f, id = 127.f / max,
    _mm256_round_ps(x * id, nearest)."""
    xb = x.reshape(-1, 32).astype(F32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, F32(127) / amax, F32(0)).astype(F32)
    q = np.rint((xb * inv[:, None]).astype(F32))
    return q.astype(np.int8), d.astype(np.float16)


def np_quantize_q8_1_x86(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """arch/x86/quants.c quantize_row_q8_1 (AVX2): as Q8_0, and
    s = GGML_CPU_FP32_TO_FP16(d * hsum(q)) with the float32 d."""
    xb = x.reshape(-1, 32).astype(F32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, F32(127) / amax, F32(0)).astype(F32)
    q = np.rint((xb * inv[:, None]).astype(F32)).astype(np.int32)
    s = (d * q.sum(axis=1).astype(F32)).astype(F32)
    return q.astype(np.int8), d.astype(np.float16), s.astype(np.float16)


def np_quantize_q8_K_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml-quants.c quantize_row_q8_K_ref, loop for loop (x86's quantize_row_q8_K)."""
    xb = x.reshape(-1, 256).astype(F32)
    qs = np.zeros(xb.shape, np.int8)
    ds = np.zeros(len(xb), F32)
    bsums = np.zeros((len(xb), 16), np.int16)
    for i, blk in enumerate(xb):
        amax, mx = F32(0), F32(0)
        for v in blk:
            if abs(v) > amax:
                amax, mx = abs(v), v
        if not amax:
            continue
        iscale = F32(F32(-127.0) / mx)
        val = ((iscale * blk).astype(F32) + F32(12582912.0)).astype(F32)  # nearest_int
        v = (val.view(np.int32) & 0x007FFFFF) - 0x00400000
        qs[i] = np.minimum(127, v)
        bsums[i] = qs[i].astype(np.int32).reshape(16, 16).sum(axis=1)
        ds[i] = F32(1) / iscale
    return qs, ds, bsums


# -- quantizers ------------------------------------------------------------------------------


def test_q8_0_matches_x86_transcription_exactly(rng: np.random.Generator) -> None:
    x = _activations(rng, 16, 1024)
    q, d = gn.quantize_q8_0(torch.from_numpy(x))
    q_ref, d_ref = np_quantize_q8_0_x86(x)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(d.numpy().view(np.uint16), d_ref.view(np.uint16))


def test_q8_0_matches_gguf_py_up_to_its_rounding_ties(rng: np.random.Generator) -> None:
    """gguf-py transcribes quantize_row_q8_0_ref (1 / d and round-half-away); the x86 path
    multiplies by 127 / max and rounds half to even. d agrees bit for bit; q only where
    x * 127 / max lands within float32 noise of a half-integer."""
    x = _activations(rng, 32, 1024)
    q, d = gn.quantize_q8_0(torch.from_numpy(x))
    blocks = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(-1, 34)
    np.testing.assert_array_equal(d.numpy().view(np.uint8).reshape(-1, 2), blocks[:, :2])
    q_gguf = blocks[:, 2:].view(np.int8)
    xb = x.reshape(-1, 32).astype(np.float64)
    amax = np.abs(xb).max(axis=1, keepdims=True)
    scaled = np.divide(xb * 127, amax, out=np.zeros_like(xb), where=amax > 0)
    near_tie = np.abs(np.abs(scaled) % 1 - 0.5) < 1e-4
    differ = q.numpy() != q_gguf
    assert not (differ & ~near_tie).any()
    assert (np.abs(q.numpy().astype(int) - q_gguf) <= 1).all()
    assert differ.sum() <= max(3, near_tie.sum())


def test_q8_1_matches_x86_transcription_exactly(rng: np.random.Generator) -> None:
    x = _activations(rng, 16, 1024)
    q, d, s = gn.quantize_q8_1(torch.from_numpy(x))
    q_ref, d_ref, s_ref = np_quantize_q8_1_x86(x)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(d.numpy().view(np.uint16), d_ref.view(np.uint16))
    np.testing.assert_array_equal(s.numpy().view(np.uint16), s_ref.view(np.uint16))


def test_q8_K_matches_ref_transcription_exactly(rng: np.random.Generator) -> None:
    x = _activations(rng, 6, 1024)
    x[1, 256:512] = -x[1, 256:512]  # both signs of the largest magnitude over the rows
    q, d, bsums = gn.quantize_q8_K(torch.from_numpy(x))
    q_ref, d_ref, b_ref = np_quantize_q8_K_ref(x)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(d.numpy().view(np.uint32), d_ref.view(np.uint32))
    np.testing.assert_array_equal(bsums.numpy(), b_ref)


# -- matmul ---------------------------------------------------------------------------------


def _random_blocks(rng: np.random.Generator, qtype: QuantType, n: int, k: int) -> torch.Tensor:
    """Random ggml blocks of a (n, k) weight whose fp16 scale fields are finite and small."""
    ts, bs = type_size(qtype), gguf.GGML_QUANT_SIZES[qtype][0]
    blocks = rng.integers(0, 256, (n * k // bs, ts), dtype=np.uint8)
    scale_fields = {
        QuantType.Q4_1: [0, 2],
        QuantType.Q5_0: [0],
        QuantType.Q8_0: [0],
        QuantType.Q4_K: [0, 2],
        QuantType.Q6_K: [ts - 2],
    }[qtype]
    for off in scale_fields:
        vals = (rng.uniform(0.5, 2.0, len(blocks)) * 2.0**-8).astype(np.float16)
        blocks[:, off : off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(n, -1))


def _np_quantized_activations(x: np.ndarray, act: QuantType):
    """(dequantized activations float64 (T, K), Q8_1's fp16 s per block or None)."""
    if act == QuantType.Q8_K:
        q, d, _ = np_quantize_q8_K_ref(x)
        return (q.astype(np.float64) * d[:, None]).reshape(x.shape), None
    q, d, s = np_quantize_q8_1_x86(x)
    xq = (q.astype(np.float64) * d.astype(np.float64)[:, None]).reshape(x.shape)
    return xq, (s.astype(np.float64).reshape(len(x), -1) if act == QuantType.Q8_1 else None)


@pytest.mark.parametrize(
    "qtype", [QuantType.Q4_1, QuantType.Q5_0, QuantType.Q8_0, QuantType.Q4_K, QuantType.Q6_K]
)
def test_matmul_is_ggmls_dot_formula(rng: np.random.Generator, qtype: QuantType) -> None:
    """y = sum over blocks of the exact integer dot times the scales (+ m * s for Q4_1), in
    float64 from the transcribed quantizers and the dequantized weight; float32 summation
    order is the only difference allowed."""
    n, k, t = 48, 768, 5
    data = _random_blocks(rng, qtype, n, k)
    x = _activations(rng, t, k)
    w = gn.pack_weight_ggml(data, qtype, (n, k))
    bias = torch.randn(n)
    y = gn.ggml_matmul(torch.from_numpy(x), w, bias).double().numpy()
    xq, s = _np_quantized_activations(x, gn.VEC_DOT_TYPE[qtype])
    if qtype == QuantType.Q4_1:
        blocks = data.numpy().reshape(n, -1, 20)
        mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)  # (n, K/32)
        scaled = dequantize(data, qtype).double().numpy() - np.repeat(mins, 32, axis=1)
        ref = xq @ scaled.T + s @ mins.T
        bound = np.abs(xq) @ np.abs(scaled).T + np.abs(s) @ np.abs(mins).T
    else:
        wd = dequantize(data, qtype).double().numpy()
        ref, bound = xq @ wd.T, np.abs(xq) @ np.abs(wd).T
    ref += bias.double().numpy()
    assert np.all(np.abs(y - ref) <= 1e-6 * bound + 1e-6), np.abs(y - ref).max()


def test_q8_1_sum_is_the_fp16_s(rng: np.random.Generator) -> None:
    """Switching the fp16 s off changes Q4_1 results: the emulation uses the stored s."""
    data = _random_blocks(rng, QuantType.Q4_1, 16, 256)
    x = torch.from_numpy(_activations(rng, 4, 256))
    w = gn.pack_weight_ggml(data, QuantType.Q4_1, (16, 256))
    exact = gn.GgmlNumerics(q8_1_sum_fp16=False)
    assert not torch.equal(gn.ggml_matmul(x, w, None), gn.ggml_matmul(x, w, None, exact))


def test_pack_rejects_wrong_block_shape() -> None:
    data = torch.zeros(4, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="expected uint8 blocks of shape"):
        gn.pack_weight_ggml(data, QuantType.Q4_1, (4, 32))


# -- attention and GELU -----------------------------------------------------------------------


def test_attention_is_fp16_rounded_float64_attention() -> None:
    """Two sequences (a prefill and a decode) through block tables, GQA, a sliding window;
    against float64 attention of the F16-rounded q, k, v with F16-rounded probabilities."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    n_heads, n_kv, d, bs = 4, 2, 16, 8
    lens, new = [13, 6], [13, 1]
    k_cache = torch.randn(6, bs, n_kv, d) * 2
    v_cache = torch.randn(6, bs, n_kv, d)
    tables = torch.tensor([[3, 0], [5, 1]], dtype=torch.int32)
    q = torch.randn(sum(new), n_heads, d) * 2
    starts = (0, 13, 14)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(new), dtype=torch.int64),
        block_tables=tables,
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=13,
        max_seq_len=13,
        seq_lens_host=tuple(lens),
        query_start_loc_host=starts,
    )
    out = gn.paged_attention_ggml(q, k_cache, v_cache, meta, scale=0.25, sliding_window=5)
    r16 = lambda t: t.half().double()  # noqa: E731
    for b, (seq_len, n_q) in enumerate(zip(lens, new, strict=True)):
        k = r16(k_cache[tables[b].long()].flatten(0, 1)[:seq_len])
        v = r16(v_cache[tables[b].long()].flatten(0, 1)[:seq_len])
        qb = r16(q[starts[b] : starts[b + 1]])
        scores = torch.einsum("qhd,khd->hqk", qb, k.repeat_interleave(2, 1)) * 0.25
        q_pos = torch.arange(seq_len - n_q, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        visible = (k_pos <= q_pos) & (q_pos - k_pos < 5)
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
        ref = torch.einsum("hqk,khd->qhd", r16(probs), v.repeat_interleave(2, 1))
        got = out[starts[b] : starts[b + 1]].double()
        # float32 sums; a probability may round to the neighbouring fp16 (2^-11 relative)
        torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)


def _np_gelu_table() -> np.ndarray:
    """vec.h ggml_gelu_f32 in numpy at every fp16, rounded to fp16: float32 operations in C's
    order, `1 + (a x) x` as one FMA (float64 product and sum, one rounding) and a correctly
    rounded tanh, as the compiled ggml computes it (checked against its own table below)."""
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        ax = (F32(gn.GELU_COEF_A) * x).astype(F32)
        poly = (ax.astype(np.float64) * x + 1.0).astype(F32)
        inner = ((F32(gn.SQRT_2_OVER_PI) * x).astype(F32) * poly).astype(F32)
        th = np.tanh(inner.astype(np.float64)).astype(F32)
        y = ((F32(0.5) * x).astype(F32) * (F32(1) + th).astype(F32)).astype(F32)
    return y.astype(np.float16)


def _used_entries() -> np.ndarray:
    """Table entries ggml reads: finite fp16 inputs with -10 < x < 10."""
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)
    return np.isfinite(x) & (x > -10) & (x < 10)


def test_gelu_table_matches_numpy_transcription() -> None:
    ours = gn.gelu_fp16_table().numpy().astype(np.float16)
    used = _used_entries()
    np.testing.assert_array_equal(
        ours.view(np.uint16)[used], _np_gelu_table().view(np.uint16)[used]
    )


def test_geglu_reads_the_table() -> None:
    gate = torch.randn(4096) * 6
    gate[:4] = torch.tensor([-12.0, 11.0, -10.0, 10.0])
    up = torch.randn(4096)
    y = gn.gelu_tanh_and_mul_ggml(gate, up)
    table = torch.from_numpy(_np_gelu_table().astype(F32))
    idx = torch.from_numpy(gate.half().numpy().view(np.uint16).astype(np.int64))
    ref = torch.where(gate <= -10, 0.0, torch.where(gate >= 10, gate, table[idx]) * up)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert y[0] == 0 and y[1] == gate[1] * up[1] and y[2] == 0


# -- llama.cpp itself (ctypes into llama-cpp-python's libggml-cpu), where installed -----------


@pytest.fixture(scope="module")
def ggml_cpu():
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python (llama.cpp's own kernels) is not installed"
    )
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so")
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    lib = ctypes.CDLL(path)
    lib.ggml_cpu_init()
    return lib


def test_gelu_table_is_llama_cpps(ggml_cpu) -> None:
    table = np.ctypeslib.as_array((ctypes.c_uint16 * 65536).in_dll(ggml_cpu, "ggml_table_gelu_f16"))
    ours = gn.gelu_fp16_table().numpy().astype(np.float16).view(np.uint16)
    used = _used_entries()
    np.testing.assert_array_equal(ours[used], table[used])


def _c_quantize(lib, name: str, x: np.ndarray, block_bytes: int, block: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.zeros(x.size // block * block_bytes, np.uint8)
    getattr(lib, name)(
        x.ctypes.data_as(ctypes.c_void_p),
        out.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int64(x.size),
    )
    return out.reshape(-1, block_bytes)


def test_quantizers_are_llama_cpps(rng: np.random.Generator, ggml_cpu) -> None:
    x = _activations(rng, 8, 1024)
    t = torch.from_numpy(x)
    c = _c_quantize(ggml_cpu, "quantize_row_q8_0", x, 34, 32)
    q, d = gn.quantize_q8_0(t)
    np.testing.assert_array_equal(
        np.concatenate([d.numpy().view(np.uint8).reshape(-1, 2), q.numpy().view(np.uint8)], 1), c
    )
    c = _c_quantize(ggml_cpu, "quantize_row_q8_1", x, 36, 32)
    q, d, s = gn.quantize_q8_1(t)
    ours = [d.numpy().view(np.uint8).reshape(-1, 2), s.numpy().view(np.uint8).reshape(-1, 2)]
    np.testing.assert_array_equal(np.concatenate([*ours, q.numpy().view(np.uint8)], 1), c)
    c = _c_quantize(ggml_cpu, "quantize_row_q8_K", x, 4 + 256 + 32, 256)
    q, d, bsums = gn.quantize_q8_K(t)
    parts = [
        d.numpy().view(np.uint8).reshape(-1, 4),
        q.numpy().view(np.uint8),
        bsums.numpy().view(np.uint8).reshape(-1, 32),
    ]
    np.testing.assert_array_equal(np.concatenate(parts, 1), c)


@pytest.mark.parametrize(
    ("qtype", "fn", "act_bytes"),
    [
        (QuantType.Q4_1, "ggml_vec_dot_q4_1_q8_1", 36),
        (QuantType.Q5_0, "ggml_vec_dot_q5_0_q8_0", 34),
        (QuantType.Q8_0, "ggml_vec_dot_q8_0_q8_0", 34),
        (QuantType.Q4_K, "ggml_vec_dot_q4_K_q8_K", 292),
        (QuantType.Q6_K, "ggml_vec_dot_q6_K_q8_K", 292),
    ],
)
def test_matmul_is_llama_cpps_vec_dot(
    rng: np.random.Generator, ggml_cpu, qtype: QuantType, fn: str, act_bytes: int
) -> None:
    n, k = 32, 1024
    data = _random_blocks(rng, qtype, n, k)
    x = _activations(rng, 1, k)[0]
    name, block = {
        QuantType.Q8_0: ("quantize_row_q8_0", 32),
        QuantType.Q8_1: ("quantize_row_q8_1", 32),
        QuantType.Q8_K: ("quantize_row_q8_K", 256),
    }[gn.VEC_DOT_TYPE[qtype]]
    xq = _c_quantize(ggml_cpu, name, x, act_bytes, block)
    out = ctypes.c_float()
    ref = []
    for row in data.numpy():
        row = np.ascontiguousarray(row)
        getattr(ggml_cpu, fn)(
            ctypes.c_int(k),
            ctypes.byref(out),
            ctypes.c_size_t(0),
            row.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_size_t(0),
            xq.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_size_t(0),
            ctypes.c_int(1),
        )
        ref.append(out.value)
    w = gn.pack_weight_ggml(data, qtype, (n, k))
    y = gn.ggml_matmul(torch.from_numpy(x)[None], w, None)[0].numpy()
    ref = np.array(ref, F32)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# -- the mode is CPU-only ----------------------------------------------------------------------


def test_engine_refuses_ggml_numerics_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from llamapy.engine import llm_engine

    monkeypatch.setattr(llm_engine, "check_device", lambda device: None)  # as if a GPU were here
    with pytest.raises(ValueError, match="runs on the CPU only; got device 'cuda'"):
        llm_engine.EngineConfig(device="cuda", cpu_kernels="ggml")
    assert llm_engine.EngineConfig(device="cpu", cpu_kernels="ggml").cpu_kernels == "ggml"


def test_cli_refuses_ggml_numerics_on_cuda(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llamapy.cli.main import main
    from llamapy.engine import llm_engine

    monkeypatch.setattr(llm_engine, "check_device", lambda device: None)
    monkeypatch.setenv("LLAMAPY_CPU_KERNELS", "ggml")
    assert main(["run", "hi", "-m", "no-such-model.gguf", "-n", "1", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "LLAMAPY_CPU_KERNELS=ggml emulates llama.cpp's CPU numerics" in err
    assert "Traceback" not in err
