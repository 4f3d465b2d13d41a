"""Shared pieces of the passes: the per-site plan, the report, and small onnx_ir helpers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from nm_onnx.graph.naming import site_name

SITE_KEY = "nm_onnx.site"  # node metadata: module path of the site a node belongs to
ROLE_KEY = "nm_onnx.role"  # node metadata: the node's role in the site's chain


@dataclass
class SitePlan:
    """What `insert` does at one linear site (resolved from the recipe and calibration by `locate`)."""

    site: object  # nm_onnx.graph.LinearSite
    n: int
    m: int
    criterion: str  # magnitude | amber | wanda | clact
    shift: str  # none | median | mean | static | learned
    variance_correction: bool
    scale_shift: bool
    constants: dict = field(default_factory=dict)  # calibration constants of this module (float32)


@dataclass
class PassReport:
    """What the passes did: per-site actions and reasons, counts per site kind."""

    sites: list[dict] = field(default_factory=list)  # {module, kind, action, reason[, pattern "N:M" if sparse]}
    fused: dict[str, str] = field(default_factory=dict)  # module -> "fused" or the reason it is not
    records: list[dict] = field(default_factory=list)  # one per sparsified site (nm_onnx.passes.record)
    packed: dict[str, str] = field(default_factory=dict)  # selection group -> "packed" or why not (pack)
    dispatch: dict = field(default_factory=dict)  # {rows, sites[, reason]} with --prefill-dispatch

    def add(self, site, action: str, reason: str = "", pattern: str | None = None) -> None:
        entry = {"module": site.module, "kind": site.kind, "action": action, "reason": reason}
        if pattern is not None:
            entry["pattern"] = pattern
        self.sites.append(entry)

    def counts(self) -> dict[str, Counter]:
        """{kind: Counter(action)} with action among sparse / dense and fused / unfused."""
        out: dict[str, Counter] = {}
        for s in self.sites:
            c = out.setdefault(s["kind"], Counter())
            c[s["action"]] += 1
            if s["action"] == "sparse":
                c["fused" if self.fused.get(s["module"]) == "fused" else "unfused"] += 1
        return out

    def table(self) -> str:
        rows = [f"{'kind':<8} {'sites':>5} {'sparse':>6} {'fused':>5} {'unfused':>7} {'dense':>5}"]
        total: Counter = Counter()
        for kind, c in sorted(self.counts().items()):
            n = c["sparse"] + c["dense"]
            rows.append(f"{kind:<8} {n:>5} {c['sparse']:>6} {c['fused']:>5} {c['unfused']:>7} {c['dense']:>5}")
            total.update(c)
        n = total["sparse"] + total["dense"]
        rows.append(
            f"{'total':<8} {n:>5} {total['sparse']:>6} {total['fused']:>5} {total['unfused']:>7} {total['dense']:>5}"
        )
        patterns = pattern_counts(self.sites)
        if len(patterns) > 1:  # a mixed recipe: say which pattern how often
            rows.append("patterns: " + ", ".join(f"{p} x {c}" for p, c in patterns.items()))
        packed = Counter(r for r in self.packed.values())
        if packed:
            rows.append(f"shared selection: {packed.pop('packed', 0)} group(s) packed into one MatMul")
        for reason, count in packed.items():
            rows.append(f"not packed ({count} group(s)): {reason}")
        if self.dispatch:
            d = self.dispatch
            rows.append(f"prefill dispatch: {d['sites']} site(s) run ORT's MatMul on the masked activation above "
                        f"{d['rows']} token row(s)" + (f" ({d['reason']})" if d.get("reason") else ""))
        reasons = Counter(r for r in self.fused.values() if r != "fused")
        for reason, count in reasons.items():
            rows.append(f"not fused ({count} site(s)): {reason}")
        dense = Counter(s["reason"] for s in self.sites if s["action"] == "dense")
        for reason, count in dense.items():
            if "override" in reason:
                rows.append(f"dense ({count} site(s)): {reason}")
        return "\n".join(rows)


def pattern_counts(entries) -> dict[str, int]:
    """{"N:M": sites} of report entries or site records (those with a pattern / n, m), most common first."""
    c: Counter = Counter()
    for e in entries:
        if "pattern" in e:
            c[e["pattern"]] += 1
        elif e.get("n") is not None and e.get("m") is not None:
            c[f"{e['n']}:{e['m']}"] += 1
    return dict(c.most_common())


def tag(node: ir.Node, site, role: str) -> ir.Node:
    node.metadata_props[SITE_KEY] = site.module
    node.metadata_props[ROLE_KEY] = role
    return node


def initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    """Register an initializer `name` holding `array` as `dtype`."""
    value = ir.Value(name=name, const_value=ir.tensor(np.array(array, dtype=dtype.numpy(), order="C"), name=name))
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(list(np.shape(array)))
    graph.register_initializer(value)
    return value


def constant(graph: ir.Graph, site, what: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    """Register an initializer `<site prefix>/<what>` holding `array` in the activation dtype."""
    return initializer(graph, site_name(site, what), array, dtype)


def opset(model: ir.Model) -> int:
    """The model's default-domain opset (18 when it names none)."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18)))


def make(op: str, inputs, site, what: str, attrs=None, domain: str = "", outputs: int = 1) -> ir.Node:
    """A node named `<site prefix>/<what>` with outputs `<site prefix>/<what>_output_<i>`."""
    name = site_name(site, what)
    outs = [ir.Value(name=f"{name}_output_{i}") for i in range(outputs)]
    node = ir.node(op, inputs, attributes=attrs or {}, domain=domain, outputs=outs, name=name)
    return tag(node, site, what)


def activation_dtype(matmul: ir.Node) -> ir.DataType:
    """Element type the MatMul computes in: its weight input's type after Cast/Transpose/Identity (a
    MatMulNBits: its activation's, or its scales' type; B is uint8)."""
    if matmul.op_type == "MatMulNBits":
        for x in (matmul.inputs[0], matmul.outputs[0], matmul.inputs[2]):
            if x is not None and x.dtype is not None:
                return x.dtype
        return ir.DataType.FLOAT
    for x in (matmul.inputs[1], matmul.inputs[0], matmul.outputs[0]):
        if x is not None and x.dtype is not None:
            return x.dtype
    v = matmul.inputs[1]
    while v is not None:
        prod = v.producer()
        if prod is None:
            break
        if prod.op_type == "Cast":
            return ir.DataType(prod.attributes.get_int("to"))
        v = prod.inputs[0]
        if v is not None and v.dtype is not None:
            return v.dtype
    return ir.DataType.FLOAT


def redirect(graph: ir.Graph, old: ir.Value, new: ir.Value, skip: set | None = None) -> None:
    """Make every consumer of `old` (except nodes in `skip`) read `new`; graph outputs keep their name.

    (onnx_ir's `replace_all_uses_with` has no `skip`: insert's chain itself reads `old`.)
    """
    skip = skip or set()
    for use in list(old.uses()):
        if use.node not in skip:
            use.node.replace_input_with(use.idx, new)
    for i, out in enumerate(graph.outputs):
        if out is old:
            name = old.name
            old.name = f"{name}/nm_onnx_pre"
            new.name = name
            if new.type is None:
                new.type = old.type
            if new.shape is None:
                new.shape = old.shape
            graph.outputs[i] = new
