"""dispatch: prompts through ORT's dense MatMul on the masked activation, decode through our kernel.

Opt-in (`transform --prefill-dispatch ROWS`). The sparse GEMM wins only on a few token rows: each
token has its own kept rows, so above ~2 rows a B vector is never shared across tokens and MLAS's
dense GEMM over the masked activation is faster (benchmarks/RESULTS.md, "Prefill dispatch"). ORT
pre-packs a MatMul's constant weight for MLAS also inside an If branch (the weight is an outer-scope
initializer), so one `If` chooses the form of the whole graph by the number of token rows:

    dense   = Greater(Size(X0), ROWS * K0)   X0, K0: input and K of the first fused site (every linear
                                             of a decoder sees the same token rows)
    outputs = If(dense, then = prefill branch, else = decode branch)

The decode branch holds the sites and every node that reads their outputs, as fused (the embedding,
attention masks and rotary tables stay outside, computed once); the prefill branch is a copy of it in
which every fused float site runs its prefill form. One If for the whole graph, not one per site: an
If costs 3-17 us per call (benchmarks/dispatch_cost.py if), which times 150-210 sites would eat up to
a quarter of a SmolLM2 decode step; the one If costs nothing measurable.

The prefill form is NMSparseMatMul's definition (docs/ops.md) with ORT's MatMul as the product:
[Xc, eta = TokenShift(X)] -> Xh = NMMask(Xc[, channel_scale]) -> MatMul(Xh, B) [+ eta * shift_bias]
[* v(X, Xh)] [+ bias]. Both branches choose the same masks and differ by summation order only (a
MatMul sums pruned rows as 0 * B, so an inf or NaN in a pruned weight row would reach the output:
LLM weights are finite). The If only picks the speed; `select_form` turns a dispatched model back
into one plain form (validate checks both; tests compare them).

Cost: ORT keeps its pre-packed copy of B beside the B our kernel reads, i.e. a second copy of every
dispatched weight in memory (about +100% of the linear weights). Quantized sites
(NMSparseMatMulNBits) are not dispatched: fuse replaced their MatMulNBits weights by K-major copies.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from nm_onnx.graph.naming import site_prefix
from nm_onnx.ops.schemas import DOMAIN, NM_MASK, NM_SPARSE_MATMUL
from nm_onnx.passes.common import (
    ROLE_KEY,
    SITE_KEY,
    PassReport,
    activation_dtype,
    initializer,
    make,
    redirect,
)
from nm_onnx.passes.common import opset as model_opset
from nm_onnx.passes.insert import variance_scale_nodes
from nm_onnx.passes.record import SITES_KEY, node_fields, nodes_by_site, site_records

DISPATCH_KEY = "nm_onnx.dispatch"  # model metadata: {"rows": ROWS, "sites": count} of a dispatched model
ROLE = "dispatch"  # ROLE_KEY of the If node
IF_NAME = "nm_onnx/dispatch"
LIMIT = "nm_onnx/dispatch/limit"  # the initializer ROWS * K0
COND_ROLE = "dispatch_condition"  # ROLE_KEY of the Size / Greater nodes computing the condition
FORMS = ("prefill", "decode")  # then / else branch
DEFAULT_ROWS = 2  # documented value: our kernel leads at 1 row, at 2 on large linears (dispatch_cost.py rows)


def prefill_nodes(graph: ir.Graph, node: ir.Node, site, opset: int) -> tuple[list[ir.Node], ir.Value]:
    """(nodes, output) computing the fused `node` with ORT's MatMul, named `<site prefix>/prefill/...`
    and tagged with the site; new constants go into `graph` (the branch reads them from outer scope).
    Sites reading one activation (q/k/v) each compute their own mask, as insert's unfused form does
    (about 25 us per mask at 128 tokens: 1% of an optimum SmolLM2 prefill for the repeats)."""
    x, b, cs, r, bias = (list(node.inputs) + [None] * 5)[:5]
    a = node.attributes
    shift = a.get_string("shift", "none")
    named = _Prefill(site)
    nodes: list[ir.Node] = []
    xc, eta = x, None
    if shift != "none":
        ts = make("TokenShift", [x], named, "TokenShift", {"mode": shift}, domain=DOMAIN, outputs=2)
        nodes.append(ts)
        xc, eta = ts.outputs
    mask = make(NM_MASK, [xc] + ([cs] if cs is not None else []), named, "NMMask",
                {"n": a.get_int("n"), "m": a.get_int("m"), "criterion": "magnitude"}, domain=DOMAIN)
    xh = mask.outputs[0]
    mm = make("MatMul", [xh, b], named, "MatMul")
    nodes += [mask, mm]
    z = mm.outputs[0]
    if r is not None and eta is not None:
        mul = make("Mul", [eta, r], named, "shift_bias_mul")
        add = make("Add", [z, mul.outputs[0]], named, "shift_bias_add")
        nodes += [mul, add]
        z = add.outputs[0]
    if a.get_int("variance_correction", 0):
        vnodes, v = variance_scale_nodes(graph, named, x, xh, activation_dtype(node), opset)
        apply = make("Mul", [z, v], named, "vc_apply")
        nodes += vnodes + [apply]
        z = apply.outputs[0]
    if bias is not None:
        add = make("Add", [z, bias], named, "bias_add")
        nodes.append(add)
        z = add.outputs[0]
    for n in nodes:
        n.metadata_props[SITE_KEY] = site.module
    return nodes, z


class _Prefill:
    """Stands for a site in insert's naming helpers so that names come out as `<site prefix>/prefill/...`."""

    def __init__(self, site):
        self.module = site.module.partition("#")[0]  # the prefix below already carries a #n suffix
        self.k = site.k
        self.matmul = f"{site_prefix(site)}/prefill/MatMul"


class DispatchPass(ir.passes.InPlacePass):
    """Wrap the fused float sites and every node that reads their outputs in one If on the token rows:
    above `rows` the branch in which every such site runs its prefill form, else the nodes as fused."""

    def __init__(self, locate, report: PassReport, rows: int = DEFAULT_ROWS):
        super().__init__()
        self.locate = locate
        self.report = report
        self.rows = rows

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sites = {p.site.module: p.site for p in self.locate.plans}

        def dispatched(n: ir.Node) -> bool:
            return n.domain == DOMAIN and n.op_type == NM_SPARSE_MATMUL and n.metadata_props.get(SITE_KEY) in sites

        first = next((n for n in graph if dispatched(n)), None)
        if first is None:
            self.report.dispatch = {"rows": self.rows, "sites": 0,
                                    "reason": "no fused float site (quantized and unfused sites are not dispatched)"}
            return ir.passes.PassResult(model, False)
        opset = model_opset(model)
        limit = initializer(graph, LIMIT, np.array(self.rows * sites[first.metadata_props[SITE_KEY]].k,
                                                   dtype=np.int64), ir.DataType.INT64)
        size = ir.node("Size", [first.inputs[0]], name="nm_onnx/dispatch/size",
                       outputs=[ir.Value(name="nm_onnx/dispatch/size_output_0")])
        cond = ir.node("Greater", [size.outputs[0], limit], name="nm_onnx/dispatch/prefill",
                       outputs=[ir.Value(name="nm_onnx/dispatch/prefill_output_0")])
        for n in (size, cond):
            n.metadata_props[ROLE_KEY] = COND_ROLE
        graph.insert_before(first, [size, cond])

        # the sites and everything that reads their outputs move into the decode branch; the rest
        # (embedding, attention masks, rotary tables) stays outside, computed once for both branches
        nodes = list(graph)
        suffix: list[ir.Node] = []
        inside: set[ir.Node] = set()
        for n in nodes[nodes.index(first):]:
            reads_inside = any(v is not None and v.producer() in inside for v in n.inputs)
            if dispatched(n) or reads_inside or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                                    for a in n.attributes.values()):
                suffix.append(n)
                inside.add(n)
        results = [v for v in graph.outputs if v.producer() in inside]
        outs = [ir.Value(name=v.name, type=v.type, shape=v.shape) for v in results]
        for v in results:
            v.name = f"{v.name}/decode"
        graph.outputs[:] = [outs[results.index(v)] if v in results else v for v in graph.outputs]
        graph.remove(suffix)
        decode = ir.Graph(inputs=[], outputs=results, nodes=suffix, name="nm_onnx/dispatch/decode")

        prefill = decode.clone(allow_outer_scope_values=True)
        prefill.name = "nm_onnx/dispatch/prefill"
        for v in prefill.outputs:
            v.name = v.name.removesuffix("/decode") + "/prefill"
        records = {r["module"]: r for r in site_records(model)}
        count = 0
        for node in [n for n in prefill if dispatched(n)]:
            module = node.metadata_props[SITE_KEY]
            pre, z = prefill_nodes(graph, node, sites[module], opset)
            y = node.outputs[0]
            z.type, z.shape = y.type, y.shape
            prefill.insert_before(node, pre)
            redirect(prefill, y, z)
            prefill.remove(node, safe=True)
            count += 1
            if module in records:
                records[module]["dispatch"] = {"prefill": [n.name for n in pre]}
        iff = ir.node("If", [cond.outputs[0]], outputs=outs, name=IF_NAME,
                      attributes={"then_branch": prefill, "else_branch": decode})
        iff.metadata_props[ROLE_KEY] = ROLE
        graph.append(iff)
        info = {"rows": self.rows, "sites": count}
        model.metadata_props[SITES_KEY] = json.dumps(list(records.values()), separators=(",", ":"))
        model.metadata_props[DISPATCH_KEY] = json.dumps(info)
        self.report.records = list(records.values())
        self.report.dispatch = info
        return ir.passes.PassResult(model, True)


def dispatch_info(model_or_proto) -> dict | None:
    """{"rows", "sites"} of a dispatched model (onnx_ir Model or ModelProto), None otherwise."""
    meta = getattr(model_or_proto, "metadata_props", None)
    raw = meta.get(DISPATCH_KEY) if isinstance(meta, dict) else next(
        (p.value for p in meta or [] if p.key == DISPATCH_KEY), None)
    return json.loads(raw) if raw else None


def select_form(model: ir.Model, form: str) -> None:
    """Replace the dispatch If by its `form` branch ("prefill" / "decode") in place: a plain model
    (no If, no dispatch metadata) whose site records describe that form."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    graph = model.graph
    for iff in [n for n in graph if n.op_type == "If" and n.metadata_props.get(ROLE_KEY) == ROLE]:
        other = iff.attributes["else_branch" if form == "prefill" else "then_branch"].as_graph()
        dropped = {v for n in other for v in n.inputs if v is not None and v.is_initializer()}
        branch = iff.attributes["then_branch" if form == "prefill" else "else_branch"].as_graph()
        nodes, results = list(branch), list(branch.outputs)
        branch.outputs.clear()
        branch.remove(nodes)
        graph.insert_before(iff, nodes)
        for old, new in zip(iff.outputs, results, strict=True):
            redirect(graph, old, new)  # graph outputs get their names back
        graph.remove(iff, safe=True)
        other.outputs.clear()
        other.remove(list(other), safe=True)  # detach the dropped form from the values it read
        for v in dropped:  # the other form's own constants (prefill: vc scalars), now unread
            if not v.uses() and v.name in graph.initializers:
                graph.initializers.pop(v.name)
    graph.remove([n for n in graph if n.metadata_props.get(ROLE_KEY) == COND_ROLE][::-1], safe=True)
    graph.initializers.pop(LIMIT, None)
    model.metadata_props.pop(DISPATCH_KEY, None)
    by_site = nodes_by_site(graph)
    records = site_records(model)
    outputs = frozenset(graph.outputs)
    for r in records:
        r.pop("dispatch", None)
        if form == "prefill":
            r.update(node_fields(r["module"], by_site.get(r["module"], []), outputs))
    model.metadata_props[SITES_KEY] = json.dumps(records, separators=(",", ":"))
