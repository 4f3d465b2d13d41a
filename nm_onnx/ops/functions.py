"""Standard-ONNX decompositions of the nm_onnx ops, as model-local functions (`--portable` models).

A model that carries these FunctionProtos runs in a plain onnxruntime without libnm_onnx_ops (ORT
inlines the body); with the library registered ORT runs the kernel instead. The bodies implement the
same contract as the numpy reference (docs/ops.md), computing in float32 (float64 for the mean and the
clact column norms):
- N:M selection by pairwise comparison inside each group of M: rank_j = #(strictly better) +
  #(equal with lower index), keep rank < N, NaN better than everything (IsNaN), -0 == +0 (Equal);
- lower median by TopK (smallest (K-1)//2 + 1) with a NaN row giving NaN, -0 turned into +0;
- string attributes are mapped to integers with ai.onnx.ml LabelEncoder; optional inputs are detected
  with OptionalHasElement (opset 18) and read through Gemm's optional C input, so absent inputs work.
Needs opset >= 18 in the default domain (and ai.onnx.ml >= 2); the caller adds both to the model.
The pairwise ranking materialises [..., K/M, M, M] booleans: fine for M <= 64, slow for M = K.
"""

from __future__ import annotations

import onnx
from onnx import parser

from nm_onnx.errors import NmOnnxError
from nm_onnx.ops.schemas import DOMAIN

MIN_OPSET = 18
ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 2

# Shared pieces of the bodies (ONNX text format). X32 = float32 X; K [1]; lead = Shape(X)[:-1].
_PRELUDE = """
  X32 = Cast <to = 1> (X)
  K = Shape <start = -1> (X32)
  lead = Shape <end = -1> (X32)
  xshape = Shape (X32)
  one = Constant <value = int64[1] {1}> ()
  zero_i = Constant <value = int64[1] {0}> ()
  last = Constant <value = int64[1] {-1}> ()
  axis0 = Constant <value = int64[1] {0}> ()
  f0 = Constant <value = float {0}> ()
  f1 = Constant <value = float {1}> ()
  fnan = Constant <value = float {nan}> ()
  finf = Constant <value = float[1] {inf}> ()
  Tn = ReduceProd <keepdims = 1> (lead)
  shape2 = Concat <axis = 0> (Tn, K)
  X2 = Reshape <allowzero = 1> (X32, shape2)
  z11 = Constant <value = float[1,1] {0}> ()
  z11t = CastLike (z11, X)
"""

# Optional per-feature vector `{name}` of length `{length}` as float32 [{length}], `{default}` when absent.
_OPTIONAL = """
  has_{name} = OptionalHasElement ({name})
  shape_{name} = Concat <axis = 0> (one, {length})
  z_{name} = Expand (z11t, shape_{name})
  v0_{name} = Gemm (z11t, z_{name}, {name})
  v1_{name} = Cast <to = 1> (v0_{name})
  v2_{name} = Reshape <allowzero = 1> (v1_{name}, {length})
  {name}32 = Where (has_{name}, v2_{name}, {default})
"""

# Per-row lower median `med` [T, 1] and float64 mean `mean` [T, 1] of X2 [T, K] (K = 0 gives 0).
_SHIFTS = """
  two = Constant <value = int64[1] {2}> ()
  km1 = Sub (K, one)
  r = Div (km1, two)
  r_nonneg = Max (r, zero_i)
  kk = Add (r_nonneg, one)
  pad_shape = Concat <axis = 0> (Tn, one)
  pad = Expand (finf, pad_shape)
  Xpad = Concat <axis = -1> (X2, pad)
  small, small_idx = TopK <largest = 0, sorted = 1, axis = -1> (Xpad, kk)
  r_end = Add (r_nonneg, one)
  med_raw = Slice (small, r_nonneg, r_end, last)
  nan_mask = IsNaN (X2)
  nan_f = Cast <to = 1> (nan_mask)
  nan_count = ReduceSum <keepdims = 1> (nan_f, last)
  has_nan = Greater (nan_count, f0)
  med_nan = Where (has_nan, fnan, med_raw)
  k_pos = Greater (K, zero_i)
  med_k = Where (k_pos, med_nan, f0)
  med = Add (med_k, f0)
  X64 = Cast <to = 11> (X2)
  sum64 = ReduceSum <keepdims = 1> (X64, last)
  K64 = Cast <to = 11> (K)
  one64 = Constant <value = double {1}> ()
  Kdiv = Max (K64, one64)
  mean64 = Div (sum64, Kdiv)
  mean = Cast <to = 1> (mean64)
"""

# N:M keep mask `keep` [T, K] of float32 scores S2 [T, K].
_SELECT = """
  Mv = Constant <value_int: int = @m> ()
  Nv = Constant <value_int: int = @n> ()
  M1 = Reshape <allowzero = 1> (Mv, one)
  G = Div (K, M1)
  gshape = Concat <axis = 0> (Tn, G, M1)
  Sg = Reshape <allowzero = 1> (S2, gshape)
  ax_m1 = Constant <value = int64[1] {-1}> ()
  ax_m2 = Constant <value = int64[1] {-2}> ()
  Sa = Unsqueeze (Sg, ax_m1)
  Sb = Unsqueeze (Sg, ax_m2)
  a_nan = IsNaN (Sa)
  b_nan = IsNaN (Sb)
  a_num = Not (a_nan)
  gt = Greater (Sb, Sa)
  nan_beats = And (b_nan, a_num)
  better = Or (gt, nan_beats)
  eq = Equal (Sb, Sa)
  both_nan = And (b_nan, a_nan)
  same = Or (eq, both_nan)
  i0 = Constant <value = int64 {0}> ()
  i1 = Constant <value = int64 {1}> ()
  idx = Range (i0, Mv, i1)
  idx_row = Unsqueeze (idx, axis0)
  idx_col = Unsqueeze (idx, one)
  lower = Less (idx_row, idx_col)
  tie_win = And (same, lower)
  beats = Or (better, tie_win)
  beats_i = Cast <to = 7> (beats)
  rank = ReduceSum <keepdims = 0> (beats_i, ax_m1)
  keep_g = Less (rank, Nv)
  keep = Reshape <allowzero = 1> (keep_g, shape2)
"""


def _nm_mask(opset: int) -> str:
    return f"""
<domain: "{DOMAIN}", opset_import: ["" : {opset}, "{ML_DOMAIN}" : {ML_OPSET}]>
NMMask <n, m, criterion: string = "magnitude"> (X, channel_scale) => (Y) {{
{_PRELUDE}
{_OPTIONAL.format(name="channel_scale", length="K", default="f1")}
  crit_s = Constant <value_string: string = @criterion> ()
  crit = {ML_DOMAIN}.LabelEncoder <keys_strings = ["magnitude", "clact"], values_int64s = [0, 1], default_int64 = 0> (crit_s)
  i_one = Constant <value = int64 {{1}}> ()
  is_clact = Equal (crit, i_one)
  X64c = Cast <to = 11> (X2)
  sq64 = Mul (X64c, X64c)
  colsq = ReduceSum <keepdims = 0> (sq64, axis0)
  col64 = Sqrt (colsq)
  col32 = Cast <to = 1> (col64)
  colf = Where (is_clact, col32, f1)
  A2 = Abs (X2)
  S1 = Mul (A2, channel_scale32)
  S2 = Mul (S1, colf)
{_SELECT}
  zt = CastLike (f0, X)
  keep_x = Reshape <allowzero = 1> (keep, xshape)
  Y0 = Where (keep_x, X, zt)
  # ORT's Where turns a selected -0 into +0: multiply kept -0 entries by -1 to restore the sign.
  is_zero = Equal (X32, f0)
  inv = Div (f1, X32)
  inv_neg = Less (inv, f0)
  neg_zero = And (is_zero, inv_neg)
  kept_neg_zero = And (neg_zero, keep_x)
  fm1 = Constant <value = float {{-1}}> ()
  sgn = Where (kept_neg_zero, fm1, f1)
  sgn_t = CastLike (sgn, X)
  Y = Mul (Y0, sgn_t)
}}
"""


def _token_shift(opset: int) -> str:
    return f"""
<domain: "{DOMAIN}", opset_import: ["" : {opset}, "{ML_DOMAIN}" : {ML_OPSET}]>
TokenShift <mode: string = "median"> (X) => (Xc, eta) {{
{_PRELUDE}
{_SHIFTS}
  mode_s = Constant <value_string: string = @mode> ()
  code = {ML_DOMAIN}.LabelEncoder <keys_strings = ["median", "mean"], values_int64s = [0, 1], default_int64 = 0> (mode_s)
  i_zero = Constant <value = int64 {{0}}> ()
  is_median = Equal (code, i_zero)
  eta2 = Where (is_median, med, mean)
  Xc2 = Sub (X2, eta2)
  Xc32 = Reshape <allowzero = 1> (Xc2, xshape)
  eshape = Concat <axis = 0> (lead, one)
  eta32 = Reshape <allowzero = 1> (eta2, eshape)
  Xc = CastLike (Xc32, X)
  eta = CastLike (eta32, X)
}}
"""


def _nm_sparse_matmul(opset: int) -> str:
    return f"""
<domain: "{DOMAIN}", opset_import: ["" : {opset}, "{ML_DOMAIN}" : {ML_OPSET}]>
NMSparseMatMul <n, m, shift: string = "none", variance_correction: int = 0>
    (X, B, channel_scale, shift_bias, bias) => (Y) {{
{_PRELUDE}
  B32 = Cast <to = 1> (B)
  Bshape = Shape (B32)
  O = Shape <start = -1> (B32)
{_OPTIONAL.format(name="channel_scale", length="K", default="f1")}
{_OPTIONAL.format(name="shift_bias", length="O", default="f0")}
{_OPTIONAL.format(name="bias", length="O", default="f0")}
{_SHIFTS}
  shift_s = Constant <value_string: string = @shift> ()
  code = {ML_DOMAIN}.LabelEncoder <keys_strings = ["none", "median", "mean"], values_int64s = [0, 1, 2], default_int64 = 0> (shift_s)
  c1 = Constant <value = int64 {{1}}> ()
  c2 = Constant <value = int64 {{2}}> ()
  is_med = Equal (code, c1)
  is_mean = Equal (code, c2)
  eta_mean = Where (is_mean, mean, f0)
  eta_sel = Where (is_med, med, eta_mean)
  is_none = Equal (code, zero_i)
  eta = Where (is_none, f0, eta_sel)
  Xs = Sub (X2, eta)
  A2 = Abs (Xs)
  S2 = Mul (A2, channel_scale32)
{_SELECT}
  Xh = Where (keep, Xs, f0)
  Z = MatMul (Xh, B32)
  eta_sb = Mul (eta, shift_bias32)
  Zs_add = Add (Z, eta_sb)
  Zs = Where (has_shift_bias, Zs_add, Z)
  vc_i = Constant <value_int: int = @variance_correction> ()
  vc = Equal (vc_i, c1)
  X64v = Cast <to = 11> (X2)
  H64 = Cast <to = 11> (Xh)
  vx = {DOMAIN}_var (X64v)
  vh = {DOMAIN}_var (H64)
  eps = Constant <value = double {{1e-9}}> ()
  vh_c = Max (vh, eps)
  ratio = Div (vx, vh_c)
  v64 = Sqrt (ratio)
  v32 = Cast <to = 1> (v64)
  K_lt2 = Less (K, two)
  v = Where (K_lt2, f1, v32)
  Zv_mul = Mul (Zs, v)
  Zv = Where (vc, Zv_mul, Zs)
  Zb_add = Add (Zv, bias32)
  Zb = Where (has_bias, Zb_add, Zv)
  yshape = Concat <axis = 0> (lead, O)
  Y32 = Reshape <allowzero = 1> (Zb, yshape)
  Y = CastLike (Y32, X)
}}
"""


def _variance_inline(body: str) -> str:
    """Expand `out = nm_onnx_var (in)` into the unbiased variance along the last axis (float64, [T, 1])."""
    lines = []
    for line in body.splitlines():
        stripped = line.strip()
        if f"{DOMAIN}_var" in stripped:
            out, arg = stripped.split("=", 1)
            out = out.strip()
            src = arg.split("(")[1].split(")")[0].strip()
            lines += [
                f"  {out}_mean = ReduceMean <keepdims = 1> ({src}, last)",
                f"  {out}_d = Sub ({src}, {out}_mean)",
                f"  {out}_d2 = Mul ({out}_d, {out}_d)",
                f"  {out}_ss = ReduceSum <keepdims = 1> ({out}_d2, last)",
                f"  {out}_km1 = Sub (K64, one64)",
                f"  {out}_den = Max ({out}_km1, one64)",
                f"  {out} = Div ({out}_ss, {out}_den)",
            ]
        else:
            lines.append(line)
    return "\n".join(lines)


def function_protos(opset: int = MIN_OPSET) -> list[onnx.FunctionProto]:
    """The standard-ONNX decompositions of TokenShift, NMMask and NMSparseMatMul (domain nm_onnx).

    `opset` is the model's default-domain opset (>= 18); the model must also import ai.onnx.ml (>= 2).
    """
    opset = int(opset)
    if opset < MIN_OPSET:
        raise NmOnnxError(
            f"nm_onnx function decompositions need default-domain opset >= {MIN_OPSET} (got {opset}); "
            "convert the model with onnx.version_converter or export it with opset >= 18"
        )
    return [
        parser.parse_function(_token_shift(opset)),
        parser.parse_function(_nm_mask(opset)),
        parser.parse_function(_variance_inline(_nm_sparse_matmul(opset))),
    ]
