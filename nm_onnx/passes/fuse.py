"""fuse: rewrite each unfused chain into one NMSparseMatMul (default on; `--no-fuse` skips it).

Written in the style of an onnxscript rewrite rule (pattern / check / rewrite): `match` binds the chain
starting at an NMMask node,

    [Xc, eta = TokenShift(X)] -> Xh = NMMask(Xc[, cs]) -> Z = MatMul(Xh, B)
    [-> Add(Z, Mul(eta, r)) | -> Add(Z, c)] [-> Mul(Z, v) with v the variance-correction subgraph]

and every failed check returns the reason, which the report shows per site. The rewrite is
NMSparseMatMul(X, B, cs, r, c) with attrs n, m, shift, variance_correction; a static/learned `Sub`
before it and a scale_shift `Mul`/`Add` after it stay as they are (exact: same operations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from nm_onnx.ops.schemas import DOMAIN
from nm_onnx.passes.common import ROLE_KEY, SITE_KEY, PassReport, redirect, role, uses


@dataclass
class Match:
    mask: ir.Node
    matmul: ir.Node
    x: ir.Value
    shift: str = "none"
    channel_scale: ir.Value | None = None
    shift_bias: ir.Value | None = None
    bias: ir.Value | None = None
    variance_correction: bool = False
    last: ir.Value | None = None  # value the fused node replaces
    removed: list[ir.Node] = field(default_factory=list)


def _only_use(value: ir.Value) -> tuple[ir.Node, int] | None:
    u = uses(value)
    if len(u) != 1 or value.is_graph_output():
        return None
    return u[0]


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None or value.is_initializer())


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


class FuseSparseMatMul:
    """pattern / check / rewrite for one NMMask-rooted chain."""

    def match(self, graph: ir.Graph, mask: ir.Node, by_site: dict | None = None) -> Match | str:
        """The bound chain, or the reason it cannot be fused (`by_site`: nodes per site tag, built once)."""
        crit = mask.attributes.get_string("criterion", "magnitude")
        if crit != "magnitude":
            return f"criterion '{crit}' has no fused kernel (NMSparseMatMul ranks by |x| * channel_scale)"
        readers = [u for u in uses(mask.outputs[0]) if not (role(u[0]) or "").startswith("vc_")]
        if len(readers) != 1 or readers[0][0].op_type != "MatMul" or readers[0][1] != 0:
            return "the NMMask output is not read by exactly one MatMul (as its activation input)"
        if mask.outputs[0].is_graph_output():
            return "the NMMask output is a graph output"
        matmul = readers[0][0]
        m = Match(mask=mask, matmul=matmul, x=mask.inputs[0], removed=[mask, matmul])
        if len(mask.inputs) > 1 and mask.inputs[1] is not None:
            if not _is_const(mask.inputs[1]):
                return "channel_scale is not a constant"
            m.channel_scale = mask.inputs[1]

        # Optional dynamic shift in front: TokenShift whose eta feeds only Mul(eta, r) -> Add(Z, .)
        ts = m.x.producer()
        z = matmul.outputs[0]
        if ts is not None and ts.op_type == "TokenShift" and ts.domain == DOMAIN:
            xc, eta = ts.outputs
            if _only_use(xc) is None:
                return "the TokenShift output is read by more than the mask"
            eu = _only_use(eta)
            if eu is None or eu[0].op_type != "Mul" or not _is_const(_other(eu[0], eta)):
                return "the TokenShift eta is not used only as Mul(eta, r) with a constant r"
            mul = eu[0]
            au = _only_use(mul.outputs[0])
            zu = _only_use(z)
            if au is None or zu is None or au[0] is not zu[0] or au[0].op_type != "Add":
                return "Mul(eta, r) is not added to the MatMul output"
            m.shift = ts.attributes.get_string("mode", "median")
            m.shift_bias = _other(mul, eta)
            m.x = ts.inputs[0]
            m.removed += [ts, mul, au[0]]
            z = au[0].outputs[0]
        else:
            zu = _only_use(z)
            if zu is not None and role(zu[0]) == "shift_bias_const_add" and _is_const(_other(zu[0], z)):
                m.bias = _other(zu[0], z)
                m.removed.append(zu[0])
                z = zu[0].outputs[0]

        # Optional variance correction: Mul(Z, v), v from the site's vc_* subgraph over (X, Xh).
        zu = _only_use(z)
        if zu is not None and role(zu[0]) == "vc_apply":
            apply = zu[0]
            vc_nodes = self._vc_nodes(graph, apply, by_site)
            entry = {role(n): n for n in vc_nodes}
            x_cast, xh_cast = entry.get("vc_x_cast"), entry.get("vc_xh_cast")
            if x_cast is None or xh_cast is None or xh_cast.inputs[0] is not mask.outputs[0]:
                return "the variance correction does not compare with the mask output (learned shift)"
            if x_cast.inputs[0] is not m.x:
                return "the variance correction reads X before a static/learned shift; no fused form"
            if m.bias is not None:
                return "variance correction would scale the baked static-shift bias; no fused form"
            m.variance_correction = True
            m.removed += vc_nodes + [apply]
            z = apply.outputs[0]
        m.last = z
        return m

    @staticmethod
    def _vc_nodes(graph: ir.Graph, apply: ir.Node, by_site: dict | None = None) -> list[ir.Node]:
        site = apply.metadata_props.get(SITE_KEY)
        nodes = by_site.get(site, []) if by_site is not None else [
            n for n in graph if n.metadata_props.get(SITE_KEY) == site]
        return [n for n in nodes if (n.metadata_props.get(ROLE_KEY) or "").startswith("vc_") and n is not apply]

    def rewrite(self, graph: ir.Graph, m: Match) -> ir.Node:
        mask, matmul = m.mask, m.matmul
        prefix = mask.name.rsplit("/", 1)[0] if "/" in (mask.name or "") else (mask.name or "nm")
        name = f"{prefix}/NMSparseMatMul"
        inputs = [m.x, matmul.inputs[1], m.channel_scale, m.shift_bias, m.bias]
        while inputs[-1] is None:
            inputs.pop()
        attrs = {
            "n": mask.attributes.get_int("n"),
            "m": mask.attributes.get_int("m"),
            "shift": m.shift,
            "variance_correction": int(m.variance_correction),
        }
        out = ir.Value(name=f"{name}_output_0")
        node = ir.node("NMSparseMatMul", inputs, attributes=attrs, domain=DOMAIN, outputs=[out], name=name)
        node.metadata_props[SITE_KEY] = mask.metadata_props.get(SITE_KEY, "")
        node.metadata_props[ROLE_KEY] = "NMSparseMatMul"
        graph.insert_before(matmul, node)
        redirect(graph, m.last, out)
        graph.remove(m.removed, safe=True)  # order-free, O(removed)
        return node


def _drop_unused_initializers(graph: ir.Graph, prefixes: set[str]) -> None:
    for name in [n for n in graph.initializers if n.rsplit("/", 1)[0] in prefixes]:
        value = graph.initializers[name]
        if not list(value.uses()) and not value.is_graph_output():
            del graph.initializers[name]


class FusePass(ir.passes.InPlacePass):
    """Apply FuseSparseMatMul at every NMMask; report 'fused' or the reason per site."""

    def __init__(self, report: PassReport | None = None):
        super().__init__()
        self.report = report if report is not None else PassReport()
        self.rule = FuseSparseMatMul()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        changed = False
        prefixes: set[str] = set()
        by_site: dict[str, list[ir.Node]] = {}
        masks = []
        for n in graph:
            if SITE_KEY in n.metadata_props:
                by_site.setdefault(n.metadata_props[SITE_KEY], []).append(n)
            if n.op_type == "NMMask" and n.domain == DOMAIN:
                masks.append(n)
        for mask in masks:
            site = mask.metadata_props.get(SITE_KEY, mask.name)
            result = self.rule.match(graph, mask, by_site)
            if isinstance(result, str):
                self.report.fused[site] = result
                continue
            node = self.rule.rewrite(graph, result)
            prefixes.add(node.name.rsplit("/", 1)[0])
            self.report.fused[site] = "fused"
            changed = True
        _drop_unused_initializers(graph, prefixes)
        return ir.passes.PassResult(model, changed)
