"""fuse: rewrite each unfused chain into one NMSparseMatMul (default on; `--no-fuse` skips it).

The chains insert writes, as onnxscript rewrite rules (pattern / check / rewrite):

    [Xc, eta = TokenShift(X)] -> Xh = NMMask(Xc[, cs]) -> Z = MatMul(Xh, B)
    [-> Add(Z, Mul(eta, r))  dynamic | -> Add(Z, c) baked, after a static/learned Sub]
    [-> Mul(Z, v)  v = the variance-correction subgraph over (X, Xh)]

become NMSparseMatMul(X, B, cs, r, c) with attrs n, m, shift, variance_correction. A chain around a
com.microsoft MatMulNBits (a quantized site) becomes NMSparseMatMulNBits(X, B', scales', zp', cs, r, c):
the same quantized values, scales and zero points re-laid out K-major (nm_onnx.ops.nbits), so the
sparse op and its dense MatMulNBits source compute with bit-identical weights. A static/learned
`Sub` before the chain and a scale_shift `Mul`/`Add` after it stay as they are (exact: same ops).

One rule per chain form (`FuseSparseMatMul(shift, variance_correction)`); the larger forms run first
(`RULE_ORDER`), so a chain is fused whole or not at all: the first `check` that refuses a site's chain
records its reason (`MatchResult.fail`), smaller forms then leave that site alone, and the report says
the reason per site. The rules keep the matched nodes (`remove_nodes=False`) so that `check`, not the
matcher, names which value is read outside the chain; the rule set then drops the dead nodes and
initializers (onnx_ir's RemoveUnusedNodesPass). Fusion reads no role tag, only the site tag
(`nm_onnx.site`) that names the site in the report and on the fused node.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.pattern import MatchResult, RewriteRuleClassBase, RewriteRuleSet, Var

from nm_onnx.errors import NmOnnxError
from nm_onnx.graph.sites import QUANT_DOMAIN
from nm_onnx.ops import nbits
from nm_onnx.ops.schemas import DOMAIN, NM_SPARSE_MATMUL, NM_SPARSE_MATMUL_NBITS
from nm_onnx.passes.common import ROLE_KEY, SITE_KEY, PassReport

FLOAT = ir.DataType.FLOAT


def _is_constant(_context, value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None or value.is_initializer())


def _variance_scale(op, x, xh):
    """Pattern of insert's v = Cast(sqrt(var(x) / max(var(xh), eps))) (`variance_scale_nodes`)."""

    def var(value):
        cast = op.Cast(value, to=FLOAT)
        centered = op.Sub(cast, op.ReduceMean(cast, _allow_other_inputs=True))
        squares = op.ReduceSum(op.Mul(centered, centered), _allow_other_inputs=True)
        return op.Div(squares, _is_constant)

    return op.Cast(op.Sqrt(op.Div(var(x), op.Max(var(xh), _is_constant))))


class _Sites:
    """Shared by the rules of one pass: the reason each refused site's chain is not fused, fused sites."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.fused: dict[str, ir.Node] = {}  # site -> its NMSparseMatMul


def _site(node: ir.Node) -> str:
    return node.metadata_props.get(SITE_KEY, node.name or "")


def _escapes(value: ir.Value | None, inside: set) -> bool:
    """True when `value` is read outside the matched nodes (or is a graph output)."""
    if value is None:
        return False
    return value.is_graph_output() or any(u.node not in inside for u in value.uses())


class FuseSparseMatMul(RewriteRuleClassBase):
    """One chain form: shift in none / dynamic (TokenShift) / baked (Add of s·B), +- variance correction."""

    def __init__(self, shift: str, variance_correction: bool, sites: _Sites, quantized: bool = False):
        vc = "+variance_correction" if variance_correction else ""
        nb = "NBits" if quantized else ""
        super().__init__(name=f"FuseSparseMatMul{nb}[{shift}{vc}]", remove_nodes=False)
        self.shift = shift
        self.vc = variance_correction
        self.sites = sites
        self.quantized = quantized

    def pattern(self, op, x, B, xv, xhv):
        xm = x
        if self.shift == "dynamic":
            xm, eta = op.TokenShift(x, _domain=DOMAIN, _outputs=["xc", "eta"])
        xh = op.NMMask(xm, _domain=DOMAIN, _allow_other_inputs=True, _outputs=["xh"])
        if self.quantized:
            z = op.MatMulNBits(xh, B, _domain=QUANT_DOMAIN, _allow_other_inputs=True, _outputs=["z"])
        else:
            z = op.MatMul(xh, B, _outputs=["z"])
        if self.shift == "dynamic":
            z = op.Add(z, op.Mul(eta, Var("r"), _outputs=["eta_r"]), _outputs=["z_shifted"])
        elif self.shift == "baked":
            z = op.Add(z, Var("c", check=_is_constant), _outputs=["z_shifted"])
        if self.vc:
            z = op.Mul(z, _variance_scale(op, xv, xhv))
        return z

    def check(self, context, x, xh, xv=None, xhv=None, **values) -> MatchResult:
        mask = xh.producer()
        result = MatchResult()
        site = _site(mask)
        if site in self.sites.reasons:  # a larger form of this chain was refused: fuse it whole or not at all
            return result.fail(self.sites.reasons[site], mask)
        reason, where = self._why_not(context, mask, x, xh, xv, xhv, values)
        if reason:
            self.sites.reasons[site] = reason
            return result.fail(reason, where)
        return result

    def _why_not(self, context, mask, x, xh, xv, xhv, values) -> tuple[str, object]:
        """The first reason this match cannot be fused (and the node or value at fault), or ("", None)."""
        inside = set(context.nodes)
        crit = mask.attributes.get_string("criterion", "magnitude")
        if crit != "magnitude":
            return f"criterion '{crit}' has no fused kernel (NMSparseMatMul ranks by |x| * channel_scale)", mask
        if self.vc and xhv is not xh:
            return "the variance correction does not compare with the mask output (learned shift)", xhv
        if self.vc and xv is not x:
            return "the variance correction reads X before a static/learned shift; no fused form", xv
        if xh.is_graph_output():
            return "the NMMask output is a graph output", xh
        if _escapes(xh, inside):
            return "the NMMask output is not read by exactly one MatMul (as its activation input)", xh
        if len(mask.inputs) > 1 and mask.inputs[1] is not None and not _is_constant(None, mask.inputs[1]):
            return "channel_scale is not a constant", mask.inputs[1]
        if self.quantized:
            try:
                _nbits_weight(values["z"].producer(), _site(mask))
            except NmOnnxError as e:
                return str(e), values["z"].producer()
        z, shifted = values.get("z"), values.get("z_shifted")
        if self.shift == "dynamic":
            eta_r = values["eta_r"]
            if _escapes(values["xc"], inside):
                return "the TokenShift output is read by more than the mask", values["xc"]
            if _escapes(values["eta"], inside) or not _is_constant(None, values.get("r")):
                return "the TokenShift eta is not used only as Mul(eta, r) with a constant r", values["eta"]
            if _escapes(eta_r, inside):
                return "Mul(eta, r) is read by more than the shift-bias Add", eta_r
        if self.shift != "none" and _escapes(z, inside):
            return "the MatMul output is read by more than the shift-bias Add", z
        if self.vc:
            if self.shift == "baked":
                return "variance correction would scale the baked static-shift bias; no fused form", shifted
            if _escapes(shifted if shifted is not None else z, inside):
                return "the sparse product is read by more than the variance correction", z
        for node in context.nodes:  # any other value of the chain read from outside (e.g. inside v)
            if node is not context.root:
                for value in node.outputs:
                    if _escapes(value, inside):
                        return f"'{value.name}' of the chain is read outside it", value
        return "", None

    def rewrite(self, op, x, B, xh, **values):
        mask = xh.producer()
        prefix = mask.name.rsplit("/", 1)[0] if "/" in (mask.name or "") else (mask.name or "nm")
        extra = [mask.inputs[1] if len(mask.inputs) > 1 else None, values.get("r"), values.get("c")]
        attrs = {}
        op_type = NM_SPARSE_MATMUL
        weight = [B]
        if self.quantized:
            op_type = NM_SPARSE_MATMUL_NBITS
            km = _nbits_weight(values["z"].producer(), _site(mask)).to_kmajor()
            weight = [op.initializer(ir.tensor(km.b), name=f"{prefix}/nbits_B"),
                      op.initializer(ir.tensor(km.scales), name=f"{prefix}/nbits_scales"),
                      None if km.zero_points is None else
                      op.initializer(ir.tensor(km.zero_points), name=f"{prefix}/nbits_zero_points")]
            attrs = {"bits": km.bits, "block_size": km.block_size}
        inputs = [x, *weight, *extra]
        while inputs[-1] is None:
            inputs.pop()
        shift = values["xc"].producer().attributes.get_string("mode", "median") if self.shift == "dynamic" else "none"
        out = getattr(op, op_type)(
            *inputs,
            n=mask.attributes.get_int("n"),
            m=mask.attributes.get_int("m"),
            **attrs,
            shift=shift,
            variance_correction=int(self.vc),
            _domain=DOMAIN,
        )
        node = out.producer()
        node.name = f"{prefix}/{op_type}"
        site = _site(mask)
        node.metadata_props[SITE_KEY] = site
        node.metadata_props[ROLE_KEY] = op_type
        self.sites.fused[site] = node
        return out


def _nbits_weight(node: ir.Node, site: str) -> nbits.MatMulNBitsWeight:
    """The constant weight of a MatMulNBits node, checked (NmOnnxError: the reason it cannot be fused)."""
    a = node.attributes
    ins = list(node.inputs) + [None] * 4
    if any(v is not None for v in ins[4:]):
        raise NmOnnxError("the MatMulNBits has g_idx or bias inputs, which NMSparseMatMulNBits does not take")
    if not all(_is_constant(None, v) for v in ins[1:3]) or (ins[3] is not None and not _is_constant(None, ins[3])):
        raise NmOnnxError("the MatMulNBits weight, scales or zero points are not constants")

    def array(v):
        return None if v is None else v.const_value.numpy()

    w = nbits.MatMulNBitsWeight(b=array(ins[1]), scales=array(ins[2]), zero_points=array(ins[3]),
                                k=a.get_int("K", 0), n=a.get_int("N", 0), bits=a.get_int("bits", 4),
                                block_size=a.get_int("block_size", 0))
    w.check(f"site '{site}' (MatMulNBits '{node.name}')")
    return w


# Larger forms first: a chain with variance correction, then a shifted chain, then NMMask -> MatMul.
RULE_ORDER = (
    (("dynamic", True), ("none", True), ("baked", True)),
    (("dynamic", False), ("baked", False)),
    (("none", False),),
)


class FusePass(ir.passes.InPlacePass):
    """Apply the FuseSparseMatMul rules; report 'fused' or the reason per site."""

    def __init__(self, report: PassReport | None = None):
        super().__init__()
        self.report = report if report is not None else PassReport()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        masks = [_site(n) for n in model.graph if n.op_type == "NMMask" and n.domain == DOMAIN]
        sites = _Sites()
        count = 0
        for forms in RULE_ORDER:
            rules = [FuseSparseMatMul.rule(shift, vc, sites, q) for shift, vc in forms for q in (False, True)]
            count += RewriteRuleSet(rules).apply_to_model(model)
        for node in sites.fused.values():  # the rewriter gave it the replaced value's name (e.g. vc_apply)
            if not node.outputs[0].is_graph_output():
                node.outputs[0].name = f"{node.name}_output_0"
        for site in masks:
            self.report.fused[site] = "fused" if site in sites.fused else sites.reasons.get(
                site, "no fuse rule matches the chain at this site")
        return ir.passes.PassResult(model, count > 0)
