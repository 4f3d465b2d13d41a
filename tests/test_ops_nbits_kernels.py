"""NMSparseMatMulNBits' C++ CPU kernel against the numpy reference (`ref.nm_sparse_matmul_nbits`).

Randomised with hypothesis: N:M patterns with K a multiple of m (often not of block_size: a last partial
block), block sizes 16..128, bits 4 and 8, symmetric (no zero points) and asymmetric weights from
`nbits.quantize`, O odd/even/1, T = 0..40 tokens (the decode kernel up to 16, the dequantized-tile prefill
path above), shift, variance correction, the optional inputs, ties, +-inf and NaN in X, float32 and float16
X. Outputs agree with the reference to GEMM tolerance (the kernel sums x * (q - zp) per K block and scales once
per block; the reference dequantizes first). Every ISA cap (NM_ONNX_SPARSE_GEMM_ISA) runs in a subprocess; one
and two intra-op threads give identical bits. Also: `MatMulNBitsWeight.to_kmajor()` keeps the dequantized
weight bit for bit, and ORT's own MatMulNBits computes x @ dequantize() of the source weight.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import assert_gemm_close, kernel_session, needs_library, node_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from nm_onnx.ops import nbits
from nm_onnx.ops import reference as ref
from nm_onnx.ops.graphs import IR_VERSION
from nm_onnx.ops.testing import assert_same, random_values

OP = "NMSparseMatMulNBits"
SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def nbits_case(rng, t, k, o, bits, block_size, symmetric, kind="normal", dtype=np.float32, use=(False,) * 3):
    """(node input names, feeds, reference keywords, dequantized W) of one case."""
    w = rng.standard_normal((k, o)).astype(np.float32)
    q = nbits.quantize(w, bits, block_size, symmetric).to_kmajor()
    x = random_values(rng, (t, k), kind, dtype)
    feeds = {"X": x, "B": q.b, "scales": q.scales}
    if q.zero_points is not None:
        feeds["zero_points"] = q.zero_points
    wd = q.dequantize()
    values = {"channel_scale": rng.choice(np.array([0.5, 1.0, 2.0]), size=k), "shift_bias": wd.sum(0),
              "bias": rng.standard_normal(o)}
    keywords = dict.fromkeys(("channel_scale", "shift_bias", "bias"))
    for name, wanted in zip(keywords, use):
        if wanted:
            feeds[name] = keywords[name] = values[name].astype(dtype)
    return node_inputs(OP, feeds), feeds, keywords, wd


def check_case(session, rng, t, nm, groups, o, bits, block_size, symmetric, kind, dtype, shift, vc, use,
               threads=1):
    n, m = nm
    names, feeds, kw, wd = nbits_case(rng, t, m * groups, o, bits, block_size, symmetric, kind, dtype, use)
    attrs = {"n": n, "m": m, "bits": bits, "block_size": block_size, "shift": shift, "variance_correction": vc}
    y = session(OP, names, ["Y"], dtype, threads=threads, **attrs).run(None, feeds)[0]
    expected = ref.nm_sparse_matmul_nbits(feeds["X"], feeds["B"], feeds["scales"], feeds.get("zero_points"),
                                          n, m, bits, block_size, shift, vc, **kw)
    assert_gemm_close(y, expected, feeds["X"], wd, n, m, shift, vc, **kw)
    return y


cases = st.fixed_dictionaries({
    "t": st.integers(0, 3) | st.sampled_from([1, 4, 16, 17, 40]),
    "nm": st.sampled_from([1, 2, 4, 8, 16, 32]).flatmap(lambda m: st.tuples(st.integers(0, m), st.just(m))),
    "groups": st.integers(1, 4) | st.sampled_from([8, 13]),
    "o": st.sampled_from([1, 2, 3, 5, 17, 31, 64, 130, 257]),
    "bits": st.sampled_from([4, 8]),
    "block_size": st.sampled_from([16, 32, 64, 128]),
    "symmetric": st.booleans(),
    "kind": st.sampled_from(["normal", "ties", "special"]),
    "dtype": st.sampled_from([np.float32, np.float16]),
    "shift": st.sampled_from(["none", "median", "mean"]),
    "vc": st.sampled_from([0, 1]),
    "use": st.tuples(st.booleans(), st.booleans(), st.booleans()),
    "seed": st.integers(0, 2**31),
})


@needs_library
@SETTINGS
@given(case=cases)
def test_nbits_kernel_matches_reference(case):
    case = dict(case)
    check_case(kernel_session, np.random.default_rng(case.pop("seed")), **case)


@needs_library
@pytest.mark.parametrize("t", [1, 5, 24])
def test_one_and_two_threads_identical(t):
    for bits, symmetric in ((4, True), (8, False)):
        rng = np.random.default_rng(t)
        names, feeds, _, _ = nbits_case(rng, t, 320, 1030, bits, 32, symmetric, "special", use=(True, True, True))
        attrs = {"n": 8, "m": 16, "bits": bits, "block_size": 32, "shift": "median", "variance_correction": 1}
        one = kernel_session(OP, names, ["Y"], threads=1, **attrs).run(None, feeds)[0]
        two = kernel_session(OP, names, ["Y"], threads=2, **attrs).run(None, feeds)[0]
        assert_same(one, two)


@needs_library
def test_wide_rows_and_nan_inf_in_kept_entries():
    """A decode-sized layer (several chunks, split-K) and a kept inf / NaN: NaN and inf entries as the reference."""
    rng = np.random.default_rng(3)
    for bits in (4, 8):
        names, feeds, _kw, wd = nbits_case(rng, 2, 1024, 20000, bits, 64, bits == 8)
        x = feeds["X"]
        x[0, 5], x[1, 700] = np.inf, np.nan
        attrs = {"n": 2, "m": 4, "bits": bits, "block_size": 64}
        y = kernel_session(OP, names, ["Y"], **attrs).run(None, feeds)[0]
        expected = ref.nm_sparse_matmul_nbits(x, feeds["B"], feeds["scales"], feeds.get("zero_points"), 2, 4, bits,
                                              64)
        assert np.isnan(y[1]).all() and not np.isfinite(y[0]).all()
        assert_gemm_close(y, expected, x, wd, 2, 4)


ISA_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import kernel_session
from test_ops_nbits_kernels import check_case
rng = np.random.default_rng(5)
for t in (0, 1, 3, 16, 17, 33):
    for bits in (4, 8):
        for bs in (16, 32, 128):
            for sym in (True, False):
                for o in (1, 7, 130, 300):
                    check_case(kernel_session, rng, t, (8, 16), 5, o, bits, bs, sym, "special", np.float32,
                               "median", 1, (True, True, True), threads=1 + (o % 2))
print("ok")
"""


@needs_library
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_every_isa_cap_matches_reference(isa):
    """The decode kernel of each instruction set (chosen once per process, so a fresh interpreter per cap)."""
    from test_sparse_matmul_perf_path import _cpu_has

    needs = {"avx512": ["avx512f", "avx512bw", "avx512vl"], "avx2": ["avx2", "fma"], "scalar": []}[isa]
    if [f for f in needs if not _cpu_has(f)]:
        pytest.skip(f"CPU cannot run the {isa} kernel")
    env = dict(os.environ, NM_ONNX_SPARSE_GEMM_ISA=isa)
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", ISA_SCRIPT, here], check=False, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 80])
def test_to_kmajor_keeps_the_weight_bit_for_bit(bits, symmetric, k):
    rng = np.random.default_rng(k + bits)
    q = nbits.quantize(rng.standard_normal((k, 37)).astype(np.float32), bits, 32, symmetric)
    kmajor = q.to_kmajor()
    assert_same(kmajor.dequantize(), q.dequantize())
    assert kmajor.b.shape == (k, nbits.packed_width(37, bits)) and kmajor.scales.shape == (nbits.n_blocks(k, 32), 37)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 80])
def test_ort_matmulnbits_computes_x_times_dequantize(bits, symmetric, k):
    """ORT's com.microsoft MatMulNBits (accuracy_level 0) on the source layout equals x @ q.dequantize()."""
    rng = np.random.default_rng(k * bits)
    n = 37
    q = nbits.quantize(rng.standard_normal((k, n)).astype(np.float32), bits, 32, symmetric)
    inits = [numpy_helper.from_array(q.b, "B"), numpy_helper.from_array(q.scales, "scales")]
    names = ["X", "B", "scales"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "zp"))
        names.append("zp")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=32, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=IR_VERSION)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, k)).astype(np.float32)
    expected = x.astype(np.float64) @ q.dequantize().astype(np.float64)
    np.testing.assert_allclose(sess.run(None, {"X": x})[0], expected, rtol=1e-4, atol=1e-4)
