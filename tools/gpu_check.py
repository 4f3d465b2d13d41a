"""One-run check of the CUDA kernels on a GPU (issue 16): correctness against the numpy references and
NMSparseMatMul decode speed against cuBLAS. Run it through `tools/gpu_check.sh OUT_DIR` (or
`make gpu-check GPU_CHECK_OUT=OUT_DIR`), which first builds the harness library
(custom_ops/tests/gpu_check_capi.cu with kernels.cu and sparse_gemv.cu: the launch code the ORT CUDA
kernels call, no ORT needed).

Correctness: every TokenShift / NMMask / NMSparseMatMul case of `cases()` (every N of every M in
{2, 4, 8, 16, 32, 64}, ties, +-0, +-inf, NaN, empty tensors, T = 1..512, odd O, optional inputs on and
off, inf / NaN weights in pruned and in kept rows of B; float32, float16, bfloat16) against
nm_onnx/ops/reference.py. Masks and the median shift must be equal bit for bit (NMSparseMatMul's masks
too: cases with an identity B return the shifted, masked rows exactly); means and GEMMs within a float
tolerance of the dtype. NMSparseMatMul's expected value sums over the kept rows of B only
(`sparse_matmul_expected`). The decode shapes of the speed table are checked too (the op against a
float32 product over the reference's kept entries).
Speed: NMSparseMatMul at T = 1, 4, 16 on Llama-7B MLP and 8B attention shapes, float16 and bfloat16,
2:4 / 8:16 / 16:32, against cuBLAS (torch.matmul) on the same weights in the same run, the GEMV alone
(selection excluded), and a device-to-device copy for the bandwidth bound. CUDA events; each round is
queued behind a sleep kernel so the times are the GPU's (not the Python launch loop's); weight copies
rotate so that B never sits in L2; medians over the rounds after a warm-up.

Backends: `cuda` (default; the harness through ctypes, with device memory, streams, events and cuBLAS
from PyTorch), `cpu` (the op library through ONNX Runtime's CPU EP, float32 / float16: the same cases
and comparisons, so this script is tested on machines without a GPU; tests/test_ops_cuda.py) and
`ort-cuda` (the op library through ORT's CUDA EP, CPU fallback disabled, node placement checked; needs
onnxruntime-gpu).

Writes OUT/gpu_check.json and OUT/gpu_check.md. Exit status: 0 everything equal, or no CUDA device
(status "no_cuda_device": nothing on a device was checked); 1 a mismatch or a CUDA error; 2 the build
failed (status "build_failed", tools/gpu_check.sh); 3 no CUDA device with --require-device. Needs numpy
(and PyTorch with CUDA for the cuda backend, onnx and onnxruntime for the others).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.util
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load(name: str, path: Path):
    """Import one file of nm_onnx/ops without nm_onnx.ops' __init__ (which needs onnx and onnxruntime)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load("nm_onnx_reference", ROOT / "nm_onnx" / "ops" / "reference.py")
testing = _load("nm_onnx_testing", ROOT / "nm_onnx" / "ops" / "testing.py")

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}  # custom_ops/cuda/launch.h DType
SHIFT_CODE = {"none": 0, "median": 1, "mean": 2}  # nm_select.h Shift
CRITERION_CODE = {"magnitude": 0, "clact": 1}  # nm_select.h Criterion
OUTPUTS = {"TokenShift": ("Xc", "eta"), "NMMask": ("Y",), "NMSparseMatMul": ("Y",)}
INPUTS = {
    "TokenShift": ("X",),
    "NMMask": ("X", "channel_scale"),
    "NMSparseMatMul": ("X", "B", "channel_scale", "shift_bias", "bias"),
}
# Relative tolerance of arithmetic outputs (means, GEMMs), as a fraction of the output's scale: float32
# accumulation order, or one rounding step of the output dtype (2^-10 float16, 2^-7 bfloat16) doubled.
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
MEAN_TOLERANCE = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to `dtype` (round to nearest even) and back to float32, exactly."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    rounded = np.where(np.isnan(x), (bits | 0x400000) & 0xFFFF0000, rounded)  # NaN stays (quiet) NaN
    return rounded.astype(np.uint32).view(np.float32)


# ----------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    op: str
    dtype: str
    attrs: dict
    inputs: dict  # input name -> float32 array whose values are exact in dtype; absent inputs missing
    exact: bool = False  # NMSparseMatMul with B = identity: Y is the masked, shifted X exactly

    def label(self) -> str:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in self.inputs.items())
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{self.op} {self.dtype} ({attrs}) {shapes}{' identity B' if self.exact else ''}"


def _x(rng, shape, kind, dtype):
    return round_to(testing.random_values(rng, shape, kind, np.float32), dtype)


def _vector(rng, n, dtype, positive=False):
    v = rng.standard_normal(n).astype(np.float32)
    return round_to(np.abs(v) + 0.5 if positive else v, dtype)


def cases(seed: int = 0, quick: bool = False, dtypes=DTYPES) -> list[Case]:
    """The correctness cases (deterministic for a seed). The primary parameters (op, N, M, criterion,
    shift, variance correction, dtype) are looped over; the secondary ones (data kind, T, shapes, O,
    optional inputs) are drawn from the seeded generator for each case, so that no two of them move in
    lockstep (tests/test_ops_cuda.py checks what the list covers). `quick` keeps every op and dtype but
    fewer N (for tests of this script)."""
    rng = np.random.default_rng(seed)
    kinds = ("normal", "ties", "special")
    tokens = (1, 2, 3, 7, 16, 17, 64, 512)

    def pick(values):
        return values[int(rng.integers(len(values)))]

    def ns(m):
        return [n for n in range(m + 1) if not quick or n in (0, 1, m // 2, m)]

    out: list[Case] = []
    # NMMask: every n of every M, both criteria, channel_scale on and off, 2-D and 3-D X.
    for m in (2, 4, 8, 16, 32, 64):
        for n in ns(m):
            for criterion in ("magnitude", "clact"):
                for dtype in dtypes:
                    t, k = pick(tokens), m * pick((1, 2, 3, 5))
                    inputs = {"X": _x(rng, pick([(t, k), (1, t, k)]), pick(kinds), dtype)}
                    if rng.random() < 0.4:
                        inputs["channel_scale"] = _vector(rng, k, dtype, positive=True)
                    out.append(Case("NMMask", dtype, {"n": n, "m": m, "criterion": criterion}, inputs))
    # NMMask with groups larger than 64 (any M works; the CPU kernels switch algorithm there).
    for n, m in ((1, 128), (100, 256)):
        for criterion in ("magnitude", "clact"):
            for dtype in dtypes:
                x = _x(rng, (3, 5, 2 * m), pick(kinds), dtype)
                out.append(Case("NMMask", dtype, {"n": n, "m": m, "criterion": criterion}, {"X": x}))
    # TokenShift: both modes, K from 0 to 4096, every data kind.
    for k in (0, 1, 2, 7, 64, 1000, 4096):
        for mode in ("median", "mean"):
            for kind in kinds:
                for dtype in dtypes:
                    t = pick(tokens) if k < 1000 else pick((1, 3, 16))
                    out.append(Case("TokenShift", dtype, {"mode": mode}, {"X": _x(rng, (t, k), kind, dtype)}))
    # NMSparseMatMul: patterns x shift x variance correction, T on both sides of the decode path (16),
    # odd O, optional inputs drawn.
    patterns = [(2, 4), (8, 16), (16, 32), (1, 4), (3, 8), (30, 64), (0, 4), (4, 4)]
    for n, m in patterns if not quick else patterns[:3] + patterns[6:7]:
        for shift in ("none", "median", "mean"):
            for vc in (0, 1):
                for dtype in dtypes:
                    t = pick(tokens)
                    k, o = m * (pick((1, 3, 16, 64)) if t <= 64 else 4), pick((1, 7, 513, 1031))
                    x = _x(rng, (t, k), "special" if rng.random() < 0.25 else "normal", dtype)
                    b = round_to(rng.standard_normal((k, o)).astype(np.float32) / math.sqrt(k), dtype)
                    inputs = {"X": x, "B": b}
                    if rng.random() < 0.4:
                        inputs["channel_scale"] = _vector(rng, k, dtype, positive=True)
                    if shift != "none" or rng.random() < 0.5:
                        inputs["shift_bias"] = round_to(b.sum(0), dtype)
                    if rng.random() < 0.5:
                        inputs["bias"] = _vector(rng, o, dtype)
                    attrs = {"n": n, "m": m, "shift": shift, "variance_correction": vc}
                    out.append(Case("NMSparseMatMul", dtype, attrs, inputs))
    # Identity B: Y is the shifted, masked X exactly, so these expose NMSparseMatMul's masks bit for bit:
    # every N of every M, T on both sides of the decode path.
    for m in (2, 4, 8, 16, 32, 64):
        for n in ns(m):
            for dtype in dtypes:
                t, k = pick((1, 4, 16, 17, 64)), m * pick((2, 5, 8))
                x = _x(rng, (t, k), pick(kinds), dtype)
                attrs = {"n": n, "m": m, "shift": pick(("none", "median", "mean")), "variance_correction": 0}
                out.append(
                    Case("NMSparseMatMul", dtype, attrs, {"X": x, "B": np.eye(k, dtype=np.float32)}, True)
                )
    # Non-finite weights: +-inf and NaN in rows of B that every token prunes (X is 0 there, the lowest
    # score of its group), so Y stays finite (pruned rows are never read); then also in a row every
    # token keeps (X is 8 there, the highest score), where they reach Y; and a kept 0 meeting an inf.
    for n, m in ((2, 4), (8, 16), (16, 32)):
        for where in ("pruned", "kept"):
            for vc in (0, 1):
                for dtype in dtypes:
                    t, k, o = pick((1, 3, 16, 17, 64)), m * 8, pick((7, 513))
                    x = _x(rng, (t, k), "normal", dtype)
                    x[:, 1::m] = 0.0  # pruned by every token (n < m, one zero per group)
                    b = round_to(rng.standard_normal((k, o)).astype(np.float32) / math.sqrt(k), dtype)
                    b[1::m] = rng.choice(np.array([np.inf, -np.inf, np.nan], np.float32), size=(k // m, o))
                    if where == "kept":
                        x[:, 0] = 8.0  # kept by every token
                        b[0, :3] = (np.inf, -np.inf, np.nan)
                        x[0, m : m + m // 2 + 1] = (
                            0.0  # token 0, group 1: more zeros than the m - n pruned ...
                        )
                        b[m : m + m // 2 + 1, 3] = np.inf  # ... so a kept 0 meets an inf: Y[0, 3] is NaN
                    inputs = {"X": x, "B": b}
                    if rng.random() < 0.5:
                        inputs["bias"] = _vector(rng, o, dtype)
                    attrs = {"n": n, "m": m, "shift": "none", "variance_correction": vc}
                    out.append(Case("NMSparseMatMul", dtype, attrs, inputs))
    # Empty tensors (T = 0, K = 0, O = 0).
    for dtype in dtypes:
        for t, k in ((0, 8), (3, 0), (0, 0)):
            x = np.zeros((t, k), np.float32)
            out.append(Case("TokenShift", dtype, {"mode": "median"}, {"X": x}))
            out.append(Case("NMMask", dtype, {"n": 2, "m": 4, "criterion": "magnitude"}, {"X": x}))
            b = np.zeros((k, 5), np.float32)
            attrs = {"n": 2, "m": 4, "shift": "mean", "variance_correction": 1}
            out.append(Case("NMSparseMatMul", dtype, attrs, {"X": x, "B": b, "bias": np.ones(5, np.float32)}))
        attrs = {"n": 2, "m": 4, "shift": "median", "variance_correction": 0}
        x = _x(rng, (3, 8), "normal", dtype)
        out.append(Case("NMSparseMatMul", dtype, attrs, {"X": x, "B": np.zeros((8, 0), np.float32)}))
    return out


def reference(case: Case) -> dict:
    """The numpy reference outputs of a case (computed in float32, rounded to the case's dtype)."""
    a, inp = case.attrs, case.inputs
    if case.op == "TokenShift":
        xc, eta = ref.token_shift(inp["X"], a["mode"])
        outs = {"Xc": xc, "eta": eta}
    elif case.op == "NMMask":
        outs = {"Y": ref.nm_mask(inp["X"], a["n"], a["m"], a["criterion"], inp.get("channel_scale"))}
    else:
        outs = {
            "Y": sparse_matmul_expected(
                inp["X"],
                inp["B"],
                a["n"],
                a["m"],
                a["shift"],
                a["variance_correction"],
                inp.get("channel_scale"),
                inp.get("shift_bias"),
                inp.get("bias"),
            )
        }
    return {k: round_to(v, case.dtype) for k, v in outs.items()}


def sparse_matmul_expected(
    x, b, n, m, shift="none", variance_correction=0, channel_scale=None, shift_bias=None, bias=None
) -> np.ndarray:
    """NMSparseMatMul's expected output under the team's semantics for non-finite weights: Y_t sums
    xh_tk * B[k, :] over the KEPT k only (IEEE on those terms; pruned rows of B are never read).

    With a finite B, or a reference that already has that semantics (kept_rows_matmul), this is
    ref.nm_sparse_matmul. Otherwise (a numpy reference whose dense product turns 0 * inf in a pruned row
    into NaN) the kept-row sums are computed here, elementwise in float64 (no BLAS, which may skip zero
    factors), with the reference's own parts (shift, mask, variance factor) and its epilogue order."""
    x, b = np.asarray(x, np.float32), np.asarray(b, np.float32)
    channel_scale = None if channel_scale is None else np.asarray(channel_scale, np.float32)
    if np.isfinite(b).all() or hasattr(ref, "kept_rows_matmul"):
        return ref.nm_sparse_matmul(x, b, n, m, shift, variance_correction, channel_scale, shift_bias, bias)
    x2 = x.reshape(-1, x.shape[-1])
    eta, xh, v = ref.sparse_matmul_parts(x2, n, m, shift, variance_correction, channel_scale)
    with np.errstate(invalid="ignore", over="ignore"):
        keep = ref.nm_keep_mask(x2 - eta[:, None], n, m, "magnitude", channel_scale)
        z64 = np.zeros((x2.shape[0], b.shape[1]))
        for t, kt in enumerate(keep):
            z64[t] = (xh[t, kt, None].astype(np.float64) * b[kt].astype(np.float64)).sum(axis=0)
        z = z64.astype(np.float32)
        if shift_bias is not None:
            z = z + eta[:, None] * np.asarray(shift_bias, np.float32)
        if int(variance_correction):
            z = z * v[:, None]
        if bias is not None:
            z = z + np.asarray(bias, np.float32)
    return z.reshape(x.shape[:-1] + (b.shape[1],))


# ----------------------------------------------------------------------------------------------- comparison
def _same_bits(got: np.ndarray, want: np.ndarray, zeros_equal: bool = False) -> int:
    """Number of entries that differ (any NaN equals any NaN; -0 differs from +0 unless zeros_equal)."""
    gn, wn = np.isnan(got), np.isnan(want)
    if zeros_equal:
        differ = (gn != wn) | (~gn & ~wn & (got != want))
    else:
        differ = (gn != wn) | (~gn & ~wn & (got.view(np.uint32) != want.view(np.uint32)))
    return int(differ.sum())


def _close(got: np.ndarray, want: np.ndarray, atol) -> int:
    """Number of entries outside tolerance: where the reference is NaN or +-inf the same value, elsewhere
    within atol (a number or an array of want's shape)."""
    special = ~np.isfinite(want)
    with np.errstate(invalid="ignore"):
        bad = special & ~((got == want) | (np.isnan(got) & np.isnan(want)))
        bad |= ~special & ~(np.abs(got - want) <= atol)
    return int(bad.sum())


def _scale(want: np.ndarray) -> float:
    finite = np.isfinite(want)
    return max(float(np.abs(want[finite]).max()) if finite.any() else 1.0, 1e-30)


def compare(case: Case, got: dict, want: dict) -> list[str]:
    """Problems found (empty: the outputs are right): one line each, naming the output and the rule."""
    problems = []
    for name in OUTPUTS[case.op]:
        g, w = np.asarray(got[name], np.float32), want[name]
        if g.shape != w.shape:
            problems.append(f"{name}: shape {list(g.shape)}, expected {list(w.shape)}")
            continue
        if g.size == 0:
            continue
        if case.op == "NMMask" or (case.op == "TokenShift" and case.attrs["mode"] == "median"):
            bad, rule = _same_bits(g, w), "bit-exact"
        elif case.op == "TokenShift":  # mean: float64 sums in another order, one rounding step apart
            rtol = MEAN_TOLERANCE[case.dtype]
            with np.errstate(invalid="ignore", over="ignore"):
                # relative to eta, plus a floor for means near 0 (sums of K values in another order)
                floor = 1e-6 * float(
                    np.abs(np.nan_to_num(case.inputs["X"], posinf=0, neginf=0)).max(initial=0)
                )
                atol = rtol * (np.abs(np.nan_to_num(want["eta"])) + floor) + 1e-30
                if name == "Xc":  # Xc = X - eta: also carries the difference of the two etas
                    eta_diff = np.abs(np.asarray(got["eta"], np.float32) - want["eta"])
                    atol = atol + rtol * np.abs(np.nan_to_num(case.inputs["X"])) + np.nan_to_num(eta_diff)
            bad, rule = _close(g, w, atol), f"within {rtol:g}"
        elif case.exact:
            bad, rule = _same_bits(g, w, zeros_equal=True), "exact (identity B)"
        else:
            rtol = TOLERANCE[case.dtype]
            bad, rule = _close(g, w, rtol * _scale(w)), f"within {rtol:g} of the output's scale"
        if bad:
            problems.append(f"{name}: {bad} of {g.size} entries differ from the reference ({rule})")
    return problems


def check_all(backend, case_list: list[Case]) -> dict:
    """Runs every case the backend supports; returns counts and the failures (label and problems)."""
    result = {"cases": 0, "passed": 0, "failed": 0, "skipped": 0, "by_op": {}, "failures": []}
    for case in case_list:
        if not backend.supports(case.dtype):
            result["skipped"] += 1
            continue
        result["cases"] += 1
        per = result["by_op"].setdefault(f"{case.op} {case.dtype}", {"cases": 0, "failed": 0})
        per["cases"] += 1
        try:
            problems = compare(case, backend.run(case), reference(case))
        except Exception as e:  # a CUDA error: recorded as a failure of this case
            problems = [f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
        if problems:
            result["failed"] += 1
            per["failed"] += 1
            if len(result["failures"]) < 50:
                result["failures"].append({"case": case.label(), "problems": problems})
        else:
            result["passed"] += 1
    return result


# ----------------------------------------------------------------------------------------------- backends
ORT_CPU, ORT_CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def ort_model(op: str, names: list[str], dtype: str, attrs: dict):
    """One nm_onnx node with float32 graph inputs and outputs; for float16 / bfloat16 the inputs are Cast
    to the dtype before the node and its outputs back to float32 after it (exact both ways for values
    of the dtype), so feeds and results are float32 numpy arrays for every dtype."""
    from onnx import TensorProto, helper

    from nm_onnx.ops.graphs import DEFAULT_OPSET, IR_VERSION
    from nm_onnx.ops.schemas import DOMAIN, OPSET_VERSION

    f32 = TensorProto.FLOAT
    elem = {"float32": f32, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]
    outs = list(OUTPUTS[op])
    inner = (lambda v: v) if elem == f32 else (lambda v: f"{v}_{dtype}" if v else v)
    nodes = [helper.make_node("Cast", [v], [inner(v)], to=elem) for v in names if v and elem != f32]
    nodes.append(
        helper.make_node(
            op, [inner(v) for v in names], [inner(v) for v in outs], domain=DOMAIN, name=f"{op}_0", **attrs
        )
    )
    nodes += [helper.make_node("Cast", [inner(v)], [v], to=f32) for v in outs if elem != f32]
    graph = helper.make_graph(
        nodes,
        f"{op}_{dtype}",
        [helper.make_tensor_value_info(v, f32, None) for v in names if v],
        [helper.make_tensor_value_info(v, f32, None) for v in outs],
    )
    imports = [helper.make_opsetid("", DEFAULT_OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    return helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION)


def node_providers(session) -> dict[str, set[str]]:
    """{op_name: providers that ran it} of the nm_onnx nodes of a session created with profiling on and
    run at least once (ORT's profile: one 'Node' event per kernel run); ends the profiling."""
    path = Path(session.end_profiling())
    try:
        events = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    out: dict[str, set[str]] = {}
    for e in events:
        args = e.get("args", {}) if e.get("cat") == "Node" else {}
        if args.get("op_name") in OUTPUTS:
            out.setdefault(args["op_name"], set()).add(args.get("provider"))
    return out


def check_placement(session, op: str, provider: str) -> None:
    """Raises unless ORT ran the `op` node of a profiled session, and only on `provider`."""
    ran = node_providers(session).get(op)
    if ran != {provider}:
        where = ", ".join(sorted(map(str, ran))) if ran else "no provider (the node never ran)"
        raise RuntimeError(f"the {op} node ran on {where}, not on {provider} alone")


class OrtBackend:
    """The op library's kernels through ONNX Runtime on one execution provider. CPUExecutionProvider
    (float32, float16) runs on any machine, so the cases and comparisons of this script are tested
    without a GPU. CUDAExecutionProvider (float32, float16, bfloat16; needs onnxruntime-gpu, which the
    lent GPU machine lacks: tests/test_ops_cuda.py uses it where it exists) runs with CPU fallback
    disabled, so a node without a CUDA kernel fails the session, and each session's first run is
    profiled to check that the nm_onnx node ran on the CUDA EP."""

    def __init__(self, provider: str = ORT_CPU):
        import tempfile

        import onnxruntime as ort

        from nm_onnx import ops

        self._ort, self._ops, self.provider, self._sessions = ort, ops, provider, {}
        # ORT's profiles (read and deleted after each session's first run); removed with the backend
        cuda = provider == ORT_CUDA
        self._profiles = tempfile.TemporaryDirectory(prefix="nm_onnx_gpu_check_") if cuda else None

    def supports(self, dtype: str) -> bool:
        return self.provider == ORT_CUDA or dtype in ("float32", "float16")

    def session(self, op: str, names: list[str], dtype: str, attrs: dict):
        """A session of the case's model; on CUDA: fallback disabled, profiled until its first run."""
        so = self._ort.SessionOptions()
        so.log_severity_level = 3
        self._ops.register_library(so)
        if self.provider == ORT_CUDA:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # no CPU EP in providers then
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(self._profiles.name) / f"{op}_{dtype}")
        return self._ort.InferenceSession(
            ort_model(op, names, dtype, attrs).SerializeToString(), so, providers=[self.provider]
        )

    def run(self, case: Case) -> dict:
        names = [name if name in case.inputs else "" for name in INPUTS[case.op]]
        while names and not names[-1]:
            names.pop()
        key = (case.op, case.dtype, tuple(names), tuple(sorted(case.attrs.items())))
        first = key not in self._sessions
        if first:
            self._sessions[key] = self.session(case.op, names, case.dtype, case.attrs)
        sess = self._sessions[key]
        outs = sess.run(None, {name: case.inputs[name] for name in names if name})
        if first and self.provider == ORT_CUDA:
            check_placement(sess, case.op, ORT_CUDA)
        return dict(zip(OUTPUTS[case.op], outs, strict=True))


def load_harness(lib_path: Path) -> ctypes.CDLL:
    """The harness library (custom_ops/tests/gpu_check_capi.cu) with its C signatures declared. It loads
    on a machine without a GPU (static cudart); its calls then return 1 with the CUDA error in err."""
    lib = ctypes.CDLL(str(lib_path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    tail = [p, ctypes.c_char_p, ctypes.c_size_t]  # stream, err, err_len
    lib.nm_check_token_shift.argtypes = [i32, p, p, p, i64, i64, i32] + tail
    lib.nm_check_nm_mask.argtypes = [i32, p, p, p, i64, i64, i32, i32, i32] + tail
    lib.nm_check_nm_sparse_matmul.argtypes = [i32, p, p, p, p, p, p, i64, i64, i64, i32, i32, i32, i32] + tail
    lib.nm_check_sparse_gemv.argtypes = [i32, p, p, i64, i64, i64, p, i64, p] + tail
    for f in (
        "nm_check_token_shift",
        "nm_check_nm_mask",
        "nm_check_nm_sparse_matmul",
        "nm_check_sparse_gemv",
        "nm_check_device_count",
    ):
        getattr(lib, f).restype = i32
    lib.nm_check_device_count.argtypes = []
    return lib


class CudaBackend:
    """The harness library (the ORT CUDA kernels' launch code) on device memory from PyTorch."""

    def __init__(self, lib_path: Path):
        import torch

        self.torch = torch
        self.lib = load_harness(lib_path)
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self.err = ctypes.create_string_buffer(1024)
        self.dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

    def supports(self, dtype: str) -> bool:
        return True

    def tensor(self, a, dtype: str):
        if a is None:
            return None
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device).to(self.dt[dtype])

    @staticmethod
    def ptr(t):
        return None if t is None or t.numel() == 0 else t.data_ptr()

    def call(self, fn, *args):
        rc = fn(*args, self.stream.cuda_stream, self.err, len(self.err))
        if rc != 0:
            raise RuntimeError(self.err.value.decode(errors="replace"))

    def run(self, case: Case) -> dict:
        torch, a, dt = self.torch, case.attrs, case.dtype
        with torch.cuda.stream(self.stream):
            x = self.tensor(case.inputs["X"], dt)
            k = x.shape[-1]
            t = int(np.prod(x.shape[:-1], dtype=np.int64))
            if case.op == "TokenShift":
                xc, eta = (
                    torch.empty_like(x),
                    torch.empty(x.shape[:-1] + (1,), dtype=x.dtype, device=self.device),
                )
                self.call(
                    self.lib.nm_check_token_shift,
                    DTYPE_CODE[dt],
                    self.ptr(x),
                    self.ptr(xc),
                    self.ptr(eta),
                    t,
                    k,
                    SHIFT_CODE[a["mode"]],
                )
                outs = {"Xc": xc, "eta": eta}
            elif case.op == "NMMask":
                y = torch.empty_like(x)
                cs = self.tensor(case.inputs.get("channel_scale"), dt)
                self.call(
                    self.lib.nm_check_nm_mask,
                    DTYPE_CODE[dt],
                    self.ptr(x),
                    self.ptr(cs),
                    self.ptr(y),
                    t,
                    k,
                    a["n"],
                    a["m"],
                    CRITERION_CODE[a["criterion"]],
                )
                outs = {"Y": y}
            else:
                b = self.tensor(case.inputs["B"], dt)
                cs, sb, bias = (
                    self.tensor(case.inputs.get(n), dt) for n in ("channel_scale", "shift_bias", "bias")
                )
                o = b.shape[1]
                y = torch.empty(x.shape[:-1] + (o,), dtype=x.dtype, device=self.device)
                self.call(
                    self.lib.nm_check_nm_sparse_matmul,
                    DTYPE_CODE[dt],
                    self.ptr(x),
                    self.ptr(b),
                    self.ptr(cs),
                    self.ptr(sb),
                    self.ptr(bias),
                    self.ptr(y),
                    t,
                    k,
                    o,
                    a["n"],
                    a["m"],
                    SHIFT_CODE[a["shift"]],
                    a["variance_correction"],
                )
                outs = {"Y": y}
            self.stream.synchronize()  # asynchronous CUDA errors surface here
        return {name: v.float().cpu().numpy() for name, v in outs.items()}


# ----------------------------------------------------------------------------------------------- speed
SPEED_SHAPES = [
    (4096, 11008, "Llama-7B gate/up"),
    (11008, 4096, "Llama-7B down"),
    (4096, 4096, "Llama-3-8B q / o"),
    (4096, 6144, "Llama-3-8B q/k/v packed"),
]
SPEED_PATTERNS = [(2, 4), (8, 16), (16, 32)]
SPEED_TOKENS = (1, 4, 16)
# Goals of issue 16 (float16, 8:16, Llama-7B MLP shapes): speedup over cuBLAS.
GOALS = [
    (1, 1.7, "T = 1 8:16 float16 >= 1.7x cuBLAS"),
    (16, 0.95, "T = 16 8:16 float16 no slower than 0.95x"),
]


def _gpu_medians(torch, stream, fns, rounds: int, warmup: int = 5, queued: bool = True) -> list[float]:
    """Median ms of each fn(r) over `rounds` interleaved rounds (CUDA events). queued: each round waits
    behind a sleep kernel, so the calls run back to back on the GPU whatever the launch loop costs;
    else every call starts on an idle GPU (its launch overhead included)."""
    for f in fns:
        for r in range(warmup):
            f(r)
    torch.cuda.synchronize()
    events = [
        [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
        for _ in fns
    ]
    sleep = getattr(torch.cuda, "_sleep", None)
    for r in range(rounds):
        if queued and sleep is not None:
            sleep(2_000_000)  # ~1 ms at ~2 GHz: longer than the host needs to enqueue one round
        for i, f in enumerate(fns):
            if not queued:
                torch.cuda.synchronize()
            start, end = events[i][r]
            start.record(stream)
            f(r)
            end.record(stream)
    torch.cuda.synchronize()
    return [float(np.median([s.elapsed_time(e) for s, e in ev])) for ev in events]


def speed(backend: CudaBackend, rounds: int, check_result: dict, quick: bool = False) -> list[dict]:
    """The speed rows; the op's output at each shape is checked too (added to check_result)."""
    torch = backend.torch
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 60 << 20) or (60 << 20))
    rows = []
    rng = np.random.default_rng(1)
    with torch.cuda.stream(backend.stream):
        for k, o, shape_name in SPEED_SHAPES[:1] if quick else SPEED_SHAPES:
            for dt in ("float16", "bfloat16"):
                rows += _speed_shape(backend, k, o, shape_name, dt, l2, rounds, rng, check_result)
                torch.cuda.empty_cache()  # this shape's weights are gone
    return rows


def _speed_shape(backend, k, o, shape_name, dt, l2, rounds, rng, check_result) -> list[dict]:
    """The rows of one weight shape and dtype: its copy bandwidth, then every pattern and T."""
    torch, stream = backend.torch, backend.stream
    nbytes = k * o * 2
    copies = max(2, math.ceil(4 * l2 / nbytes))  # the rotation never finds B in L2
    weights = [
        torch.randn(k, o, device=backend.device, dtype=backend.dt[dt]) / math.sqrt(k) for _ in range(copies)
    ]
    scratch = torch.empty_like(weights[0])
    (copy_ms,) = _gpu_medians(torch, stream, [lambda r: scratch.copy_(weights[r % copies])], rounds)
    bandwidth = 2 * nbytes / (copy_ms * 1e-3) / 1e9  # read + write
    return [
        _speed_row(
            backend,
            weights,
            copies,
            k,
            o,
            n,
            m,
            t,
            dt,
            shape_name,
            rounds,
            copy_ms,
            bandwidth,
            rng,
            check_result,
        )
        for n, m in SPEED_PATTERNS
        for t in SPEED_TOKENS
    ]


def _speed_row(
    backend, weights, copies, k, o, n, m, t, dt, shape_name, rounds, copy_ms, bandwidth, rng, check_result
) -> dict:
    torch, lib = backend.torch, backend.lib
    tdt, code = backend.dt[dt], DTYPE_CODE[dt]
    kept = k // m * n
    xs_np = [round_to(rng.standard_normal((t, k)).astype(np.float32), dt) for _ in range(4)]
    keeps = [ref.nm_keep_mask(x, n, m) for x in xs_np]
    xs = [backend.tensor(x, dt) for x in xs_np]
    x32 = [torch.from_numpy(x).to(backend.device) for x in xs_np]  # the GEMV reads float32 activations
    idx = [
        torch.from_numpy(np.nonzero(kp)[1].astype(np.int32).reshape(t, kept)).to(backend.device)
        for kp in keeps
    ]
    y = torch.empty(t, o, device=backend.device, dtype=tdt)
    y_dense = torch.empty_like(y)
    z = torch.empty(t, o, device=backend.device, dtype=torch.float32)
    s = backend.stream.cuda_stream
    err, err_len = backend.err, len(backend.err)

    def op(r):
        if lib.nm_check_nm_sparse_matmul(
            code,
            xs[r % 4].data_ptr(),
            weights[r % copies].data_ptr(),
            None,
            None,
            None,
            y.data_ptr(),
            t,
            k,
            o,
            n,
            m,
            0,
            0,
            s,
            err,
            err_len,
        ):
            raise RuntimeError(err.value.decode(errors="replace"))

    def gemv(r):
        if lib.nm_check_sparse_gemv(
            code,
            x32[r % 4].data_ptr(),
            idx[r % 4].data_ptr(),
            t,
            k,
            kept,
            weights[r % copies].data_ptr(),
            o,
            z.data_ptr(),
            s,
            err,
            err_len,
        ):
            raise RuntimeError(err.value.decode(errors="replace"))

    def dense(r):
        torch.matmul(xs[r % 4], weights[r % copies], out=y_dense)

    # The op at this shape against a float32 product over the reference's kept entries.
    op(0)
    want = (x32[0] * torch.from_numpy(keeps[0]).to(backend.device)) @ weights[0].float()
    got = y.float()
    atol = TOLERANCE[dt] * float(want.abs().max())
    bad = int(((got - want).abs() > atol).sum())
    check_result["cases"] += 1
    per = check_result["by_op"].setdefault(f"NMSparseMatMul {dt} (speed shapes)", {"cases": 0, "failed": 0})
    per["cases"] += 1
    if bad:
        check_result["failed"] += 1
        per["failed"] += 1
        check_result["failures"].append(
            {
                "case": f"NMSparseMatMul {dt} {n}:{m} T={t} {k}x{o} (speed shape)",
                "problems": [f"Y: {bad} of {t * o} entries beyond {atol:g}"],
            }
        )
    else:
        check_result["passed"] += 1

    op_ms, gemv_ms, dense_ms = _gpu_medians(torch, backend.stream, [op, gemv, dense], rounds)
    op_serial_ms, dense_serial_ms = _gpu_medians(
        torch, backend.stream, [op, dense], max(5, rounds // 2), queued=False
    )
    kept_bytes = kept * o * 2
    return {
        "shape": f"{k}x{o}",
        "what": shape_name,
        "dtype": dt,
        "pattern": f"{n}:{m}",
        "T": t,
        "cublas_ms": dense_ms,
        "op_ms": op_ms,
        "speedup": dense_ms / op_ms,
        "gemv_ms": gemv_ms,
        "gemv_speedup": dense_ms / gemv_ms,
        "op_launch_included_ms": op_serial_ms,
        "cublas_launch_included_ms": dense_serial_ms,
        "copy_GBps": bandwidth,
        "dense_bound_ms": copy_ms / 2,
        "sparse_bound_ms": copy_ms / 2 * kept_bytes / (k * o * 2),
        "op_kept_B_GBps": kept_bytes / (op_ms * 1e-3) / 1e9,
    }


def goals(rows: list[dict]) -> list[dict]:
    out = []
    for t, target, text in GOALS:
        got = {
            r["shape"]: r["speedup"]
            for r in rows
            if r["T"] == t
            and r["pattern"] == "8:16"
            and r["dtype"] == "float16"
            and r["what"].startswith("Llama-7B")
        }
        if got:
            out.append({"goal": text, "speedups": got, "met": all(v >= target for v in got.values())})
    return out


# ----------------------------------------------------------------------------------------------- report
def environment(backend_name: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "backend": backend_name,
    }
    try:
        env["commit"] = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["device"] = p.name
            env["sms"] = p.multi_processor_count
            env["memory_GiB"] = round(p.total_memory / 2**30, 1)
            env["capability"] = f"{p.major}.{p.minor}"
    except ImportError:
        env["torch"] = None
    try:
        q = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"]
        env["nvidia_smi"] = (
            subprocess.run(q, capture_output=True, text=True, timeout=20).stdout.strip() or None
        )
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    return env


def markdown(report: dict) -> str:
    env, corr = report["environment"], report.get("correctness")
    lines = [
        f"# GPU check: {report['status']}",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None),
        "",
    ]
    if report.get("message"):
        lines += [report["message"], ""]
    if corr:
        lines += [
            f"Correctness: {corr['passed']} of {corr['cases']} cases equal the numpy reference "
            f"({corr['failed']} failed, {corr['skipped']} skipped: dtype not on this backend).",
            "",
            "| op dtype | cases | failed |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v['cases']} | {v['failed']} |" for k, v in sorted(corr["by_op"].items())]
        for f in corr["failures"][:20]:
            lines.append(f"- FAILED {f['case']}: {'; '.join(f['problems'])}")
        lines.append("")
    gemv = report.get("sparse_gemv_test")
    if gemv:
        lines += [f"custom_ops/tests/sparse_gemv_test.cu: exit {gemv['rc']} ({gemv['output']})", ""]
    rows = report.get("speed") or []
    if rows:
        lines += [
            "Speed: medians of CUDA-event times, each round queued behind a sleep kernel (GPU time); "
            "'launch incl.' starts each call on an idle GPU. Speedup = cuBLAS / NMSparseMatMul. Bound: "
            "a device-to-device copy's bandwidth applied to the bytes of B read (dense: all of B; "
            "sparse: the kept N/M).",
            "",
            "| shape | dtype | N:M | T | cuBLAS ms | NMSparseMatMul ms | speedup | GEMV only ms | GEMV speedup "
            "| bound speedup | op launch incl. ms | cuBLAS launch incl. ms | op kept-B GB/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['shape']} ({r['what']}) | {r['dtype']} | {r['pattern']} | {r['T']} | {r['cublas_ms']:.4f} "
                f"| {r['op_ms']:.4f} | {r['speedup']:.2f} | {r['gemv_ms']:.4f} | {r['gemv_speedup']:.2f} "
                f"| {r['dense_bound_ms'] / r['sparse_bound_ms']:.2f} | {r['op_launch_included_ms']:.4f} "
                f"| {r['cublas_launch_included_ms']:.4f} | {r['op_kept_B_GBps']:.0f} |"
            )
        lines += ["", f"Device-to-device copy: {rows[0]['copy_GBps']:.0f} GB/s (read + write)", ""]
    for g in report.get("goals") or []:
        got = ", ".join(f"{k} {v:.2f}x" for k, v in g["speedups"].items())
        lines.append(f"- goal {g['goal']}: {got}: {'met' if g['met'] else 'missed'}")
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def _run_gemv_test(exe: Path | None) -> dict | None:
    """custom_ops/tests/sparse_gemv_test.cu's result: exit 0 pass, 77 no device, else a mismatch."""
    if exe is None:
        return None
    p = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    lines = (p.stdout + p.stderr).strip().splitlines()
    return {"rc": p.returncode, "output": lines[-1] if lines else ""}


def _no_device(args, report: dict, case_list: list[Case], why: str) -> int:
    """The no-GPU path: the host side still runs (every case and its reference; the harness library
    loads and counts devices; sparse_gemv_test reports its skip); status no_cuda_device, exit 0 (3
    with --require-device)."""
    for c in case_list:
        reference(c)
    loaded = ""
    if args.lib is not None:  # the harness loads without a GPU (static cudart) and sees no device
        count = load_harness(args.lib).nm_check_device_count()
        loaded = f" The harness library {args.lib.name} loads and sees {count} CUDA devices."
    report["status"] = "no_cuda_device"
    report["message"] = (
        f"no CUDA device ({why}): nothing was checked on a GPU. The {len(case_list)} "
        f"cases and their numpy references were generated.{loaded}"
    )
    report["sparse_gemv_test"] = _run_gemv_test(args.gemv_test)
    write(args.out, report)
    print(f"gpu_check: {report['message']} Wrote {args.out}/gpu_check.json and .md")
    return 3 if args.require_device else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument(
        "--backend",
        choices=["cuda", "cpu", "ort-cuda"],
        default="cuda",
        help="cuda: the harness library (default); cpu / ort-cuda: the op library through ONNX "
        "Runtime's CPU / CUDA execution provider",
    )
    ap.add_argument(
        "--lib", type=Path, help="the harness library (cuda backend; tools/gpu_check.sh builds it)"
    )
    ap.add_argument(
        "--gemv-test", type=Path, help="custom_ops/tests/sparse_gemv_test.cu built (exit 77: no device)"
    )
    ap.add_argument(
        "--build-failed",
        type=Path,
        metavar="LOG",
        help="(tools/gpu_check.sh) the build failed: report LOG's tail and exit 2",
    )
    ap.add_argument(
        "--build-info", default=None, help="(tools/gpu_check.sh) compiler and build time, for the report"
    )
    ap.add_argument("--rounds", type=int, default=50, help="timed rounds per speed row")
    ap.add_argument("--quick", action="store_true", help="fewer cases and one speed shape")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument(
        "--require-device", action="store_true", help="exit 3 instead of 0 when there is no CUDA device"
    )
    args = ap.parse_args(argv)
    t0 = time.time()
    report = {"status": "running", "environment": environment(args.backend)}
    if args.build_info:
        report["environment"]["build"] = args.build_info
    if args.build_failed is not None:
        log = (
            args.build_failed.read_text(errors="replace").strip().splitlines()
            if args.build_failed.exists()
            else []
        )
        report["status"] = "build_failed"
        report["message"] = "the harness did not build: " + (" | ".join(log[-12:]) or "no compiler output")
        write(args.out, report)
        print(f"gpu_check: {report['message']}")
        return 2
    case_list = cases(quick=args.quick)

    if args.backend == "cpu":
        backend = OrtBackend(ORT_CPU)
    elif args.backend == "ort-cuda":
        backend = OrtBackend(ORT_CUDA)
    else:
        try:
            import torch

            has_device = torch.cuda.is_available() and torch.cuda.device_count() > 0
            why = "torch.cuda.is_available() is False"
        except ImportError:
            has_device, why = False, "PyTorch is not installed"
        if not has_device:
            return _no_device(args, report, case_list, why)
        if args.lib is None:
            ap.error("--lib is required with the cuda backend (tools/gpu_check.sh builds it)")
        backend = CudaBackend(args.lib)

    report["sparse_gemv_test"] = _run_gemv_test(args.gemv_test) if args.backend == "cuda" else None
    corr = check_all(backend, case_list)
    report["correctness"] = corr
    write(args.out, report)  # kept if the speed part is cut short
    print(
        f"gpu_check: correctness {corr['passed']}/{corr['cases']} passed ({time.time() - t0:.0f} s)",
        flush=True,
    )
    if args.backend == "cuda" and not args.skip_speed:
        try:
            report["speed"] = speed(backend, args.rounds, corr, quick=args.quick)
            report["goals"] = goals(report["speed"])
        except Exception as e:  # a CUDA error in the speed part: reported, and the check fails
            report["status"] = "error"
            report["message"] = f"speed part stopped: {type(e).__name__}: {e}"
    gemv = report["sparse_gemv_test"]
    if corr["failed"] or (gemv is not None and gemv["rc"] != 0):
        report["status"] = "mismatch"
    elif report["status"] == "running":
        report["status"] = "pass"
    report["seconds"] = round(time.time() - t0, 1)
    write(args.out, report)
    print(markdown(report))
    return 0 if report["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
