"""insert: the unfused form of activation sparsity at every planned linear site.

Per site (X -> MatMul(X, B) -> Y), by recipe:
    Xc, eta = TokenShift(X)               dynamic median/mean shift     | Xc = Sub(X, s)  static/learned
    Xh      = NMMask(Xc[, channel_scale]) Amber/Wanda factors baked, criterion clact as attribute
    Z       = MatMul(Xh, B)               the original node, B untouched (Cast/Transpose kept; or the
                                          site's MatMulNBits: the constants come from its dequantized B)
    Z       = Add(Z, Mul(eta, r))         r = W·1 (dynamic)   | Add(Z, s·B) baked (static/learned)
    Z       = Mul(Z, v)                   variance correction, v = sqrt(var(X)/max(var(X^),1e-9))
    Z       = Add(Mul(Z, 1 + a), b)       learned scale_shift
The original consumers of Y (e.g. the linear's bias Add) read the last Z. This is the deployable form
of `nm_onnx.reference.sparse_linear`; the fuse pass turns it into one NMSparseMatMul.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from nm_onnx.graph.constants import shift_times_weight, site_constants_parallel, weight_constants
from nm_onnx.graph.sites import QUANT_OP
from nm_onnx.method import VAR_EPS
from nm_onnx.ops.schemas import DOMAIN
from nm_onnx.passes.common import SitePlan, activation_dtype, constant, make, redirect, tag
from nm_onnx.passes.common import opset as model_opset


def _reduce(op: str, x, site, what: str, opset: int, axes_value: ir.Value | None) -> ir.Node:
    if op == "ReduceMean" and opset < 18 or op == "ReduceSum" and opset < 13:
        return make(op, [x], site, what, {"axes": [-1], "keepdims": 1})
    return make(op, [x, axes_value], site, what, {"keepdims": 1})


def variance_scale_nodes(graph, site, x: ir.Value, xh: ir.Value, dtype, opset: int) -> tuple[list, ir.Value]:
    """Nodes computing v = sqrt(var(x) / max(var(xh), 1e-9)) per row (unbiased, float32) as `dtype`."""
    k = site.k
    axes = constant(graph, site, "vc_axes", np.array([-1], dtype=np.int64), ir.DataType.INT64)
    dof = constant(graph, site, "vc_dof", np.array(max(k - 1, 1), dtype=np.float32), ir.DataType.FLOAT)
    eps = constant(graph, site, "vc_eps", np.array(VAR_EPS, dtype=np.float32), ir.DataType.FLOAT)
    nodes: list[ir.Node] = []

    def var(value, tagname):
        cast = make("Cast", [value], site, f"vc_{tagname}_cast", {"to": ir.DataType.FLOAT})
        mean = _reduce("ReduceMean", cast.outputs[0], site, f"vc_{tagname}_mean", opset, axes)
        d = make("Sub", [cast.outputs[0], mean.outputs[0]], site, f"vc_{tagname}_centered")
        sq = make("Mul", [d.outputs[0], d.outputs[0]], site, f"vc_{tagname}_squares")
        ss = _reduce("ReduceSum", sq.outputs[0], site, f"vc_{tagname}_sum", opset, axes)
        v = make("Div", [ss.outputs[0], dof], site, f"vc_{tagname}_var")
        nodes.extend([cast, mean, d, sq, ss, v])
        return v.outputs[0]

    vx = var(x, "x")
    vh = var(xh, "xh")
    floor = make("Max", [vh, eps], site, "vc_floor")
    ratio = make("Div", [vx, floor.outputs[0]], site, "vc_ratio")
    root = make("Sqrt", [ratio.outputs[0]], site, "vc_sqrt")
    back = make("Cast", [root.outputs[0]], site, "vc_scale", {"to": dtype})
    nodes.extend([floor, ratio, root, back])
    return nodes, back.outputs[0]


def _weight_job(plan: SitePlan):
    """(site, criterion whose factors are computed from the weight or None, need r = W·1)."""
    calibrated = plan.constants.get("channel_scale")  # an artifact's factors win over recomputing them
    return plan.site, (None if calibrated is not None else plan.criterion), plan.shift in ("median", "mean")


def site_nodes(graph: ir.Graph) -> dict[str, ir.Node]:
    """{node name: node} of the graph, built once per pass (a site is found by name, not by a scan)."""
    return {n.name: n for n in graph if n.name}


def insert_site(model: ir.Model, plan: SitePlan, opset: int, weight_consts=None, by_name=None) -> None:
    """Insert the chain at one site; `weight_consts` = (factors, r) when already computed.

    The site's own MatMul and bias Add are tagged too, so the site's nodes are exactly the nodes
    tagged with its module (the record pass reads that).
    """
    graph = model.graph
    site = plan.site
    by_name = by_name if by_name is not None else site_nodes(graph)
    matmul = by_name.get(site.matmul)
    op_type = QUANT_OP if site.quant is not None else "MatMul"
    if matmul is None or matmul.op_type != op_type or matmul.outputs[0].name != site.output:
        matmul = next(n for n in graph if n.op_type == op_type and n.outputs[0].name == site.output)
    tag(matmul, site, "matmul")
    bias_add = by_name.get(site.bias_add) if site.bias_add else None
    if bias_add is not None:
        tag(bias_add, site, "bias_add")
    x, y = matmul.inputs[0], matmul.outputs[0]
    dtype = activation_dtype(matmul)
    calibrated = plan.constants.get("channel_scale")
    factors, r = weight_consts if weight_consts is not None else weight_constants(model, *_weight_job(plan))
    if calibrated is not None and plan.criterion in ("amber", "wanda"):
        factors = calibrated.reshape(-1)

    before: list[ir.Node] = []
    after: list[ir.Node] = []
    eta = None
    xc = x
    if plan.shift in ("median", "mean"):
        ts = make("TokenShift", [x], site, "TokenShift", {"mode": plan.shift}, domain=DOMAIN, outputs=2)
        before.append(ts)
        xc, eta = ts.outputs
    elif plan.shift in ("static", "learned"):
        key = "static_shift" if plan.shift == "static" else "learned_shift"
        s = plan.constants[key].reshape(-1)
        s_val = constant(graph, site, key, s, dtype)
        sub = make("Sub", [x, s_val], site, "shift_sub")
        before.append(sub)
        xc = sub.outputs[0]

    mask_inputs = [xc]
    if factors is not None:
        mask_inputs.append(constant(graph, site, "channel_scale", factors, dtype))
    criterion = "clact" if plan.criterion == "clact" else "magnitude"
    mask = make("NMMask", mask_inputs, site, "NMMask", {"n": plan.n, "m": plan.m, "criterion": criterion}, domain=DOMAIN)
    before.append(mask)
    xh = mask.outputs[0]
    matmul.replace_input_with(0, xh)

    z = y
    if eta is not None:
        r_val = constant(graph, site, "shift_bias", r, dtype)
        mul = make("Mul", [eta, r_val], site, "shift_bias_mul")
        add = make("Add", [z, mul.outputs[0]], site, "shift_bias_add")
        after += [mul, add]
        z = add.outputs[0]
    elif plan.shift in ("static", "learned"):
        key = "static_shift" if plan.shift == "static" else "learned_shift"
        sb = shift_times_weight(model, site, plan.constants[key])
        add = make("Add", [z, constant(graph, site, "shift_bias_const", sb, dtype)], site, "shift_bias_const_add")
        after.append(add)
        z = add.outputs[0]
    if plan.variance_correction:
        xhat = xh
        if plan.shift == "learned":  # x^ = xh + s is not a per-row constant shift of xh
            back = make("Add", [xh, before[0].inputs[1]], site, "vc_xhat")
            after.append(back)
            xhat = back.outputs[0]
        nodes, v = variance_scale_nodes(graph, site, x, xhat, dtype, opset)
        apply = make("Mul", [z, v], site, "vc_apply")
        after += nodes + [apply]
        z = apply.outputs[0]
    if plan.scale_shift:
        a = plan.constants["scale_a"].reshape(-1).astype(np.float64)
        b = plan.constants["scale_b"].reshape(-1)
        mul = make("Mul", [z, constant(graph, site, "scale_a_plus_1", 1.0 + a, dtype)], site, "scale_mul")
        add = make("Add", [mul.outputs[0], constant(graph, site, "scale_b", b, dtype)], site, "scale_add")
        after += [mul, add]
        z = add.outputs[0]

    graph.insert_before(matmul, before)
    if after:
        graph.insert_after(matmul, after)
        redirect(graph, y, z, skip=set(after))


class InsertPass(ir.passes.InPlacePass):
    """Insert the unfused sparsity chain at every site of `plans`.

    The weight constants (r = W·1, channel factors) are computed on a thread pool, one weight per
    worker, each read once (`nm_onnx.graph.constants`); the graph is edited on this thread as the
    results arrive, in site order, so the output does not depend on the number of workers.
    """

    def __init__(self, locate, workers: int | None = None):
        super().__init__()
        self.locate = locate  # the LocatePass whose plans this pass executes
        self.workers = workers  # None: nm_onnx.graph.constants.default_workers()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model_opset(model)
        plans: list[SitePlan] = self.locate.plans
        by_name = site_nodes(model.graph)
        results = site_constants_parallel(model, [_weight_job(p) for p in plans], self.workers)
        for plan, consts in zip(plans, results, strict=True):
            insert_site(model, plan, opset, consts, by_name)
        return ir.passes.PassResult(model, bool(plans))
