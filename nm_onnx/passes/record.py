"""record: the identity of every sparsified site, written once, read by everything downstream.

The insert pass tags every node of a site (its MatMul, bias Add and everything it inserts) with the
site's module path (`nm_onnx.site`); fuse keeps the tag on the fused node. After the rewrite this pass
groups the nodes by tag and writes one record per site:

    module, kind, layer, k, o             the linear site (nm_onnx.graph.LinearSite)
    input                                 the activation value X the site reads
    output                                the one value the site's nodes hand to the rest of the graph
    nodes                                 the names of the site's nodes, in graph order
    op, fused                             NMSparseMatMul[NBits] (fused) or NMMask (unfused)
    quant                                 None, or {bits, block_size, symmetric} of a quantized site
    n, m, criterion, shift, variance_correction, scale_shift
    constants                             the initializers the site's nodes read (weights included)
    dispatch                              only with `--prefill-dispatch`: {if, prefill}, the site's If node
                                          and its prefill-branch nodes (nodes above: the decode form)

The records go into the model's metadata (`nm_onnx.sites`, JSON) and the transform report
(`nm_onnx_transform.json`), so `validate`, `bench`'s per-site profile and `inspect` find a site by
what the transform did, never by a naming rule (dynamo exports name nodes `node_linear_N`; duplicate
module paths carry a `#n` suffix).
"""

from __future__ import annotations

import json

import onnx_ir as ir

from nm_onnx.errors import NmOnnxError
from nm_onnx.ops.schemas import DOMAIN, NM_MASK, SPARSE_MATMULS
from nm_onnx.passes.common import SITE_KEY, PassReport, SitePlan

SITES_KEY = "nm_onnx.sites"  # model metadata: JSON list of site records


def site_records(model_or_proto) -> list[dict]:
    """The site records a transformed model carries (onnx_ir Model or ModelProto); [] for a dense model."""
    meta = getattr(model_or_proto, "metadata_props", None)
    if isinstance(meta, dict):
        raw = meta.get(SITES_KEY)
    else:
        raw = next((p.value for p in meta or [] if p.key == SITES_KEY), None)
    if not raw:
        return []
    try:
        records = json.loads(raw)
    except ValueError:
        raise NmOnnxError(f"the model's '{SITES_KEY}' metadata is not valid JSON (edited by hand?)") from None
    return records if isinstance(records, list) else []


def nodes_by_site(graph: ir.Graph) -> dict[str, list[ir.Node]]:
    """{site module: its nodes in graph order}, by the site tag insert wrote (top-level nodes only)."""
    out: dict[str, list[ir.Node]] = {}
    for n in graph:
        key = n.metadata_props.get(SITE_KEY)
        if key is not None:
            out.setdefault(key, []).append(n)
    return out


def node_fields(module: str, nodes: list[ir.Node], graph_outputs) -> dict:
    """The fields of a record that the site's nodes decide: output, nodes, op, fused, constants."""
    inside = set(map(id, nodes))
    leaving = []
    for n in nodes:
        for v in n.outputs:
            if v is None:
                continue
            users = [u.node for u in v.uses()]
            if v in graph_outputs or any(id(u) not in inside for u in users):
                leaving.append(v.name)
    if len(leaving) != 1:
        raise NmOnnxError(
            f"internal: site '{module}' hands {len(leaving)} values to the rest of the graph "
            f"({leaving[:4]}), expected exactly 1"
        )
    sparse = [n for n in nodes if n.domain == DOMAIN and n.op_type in (*SPARSE_MATMULS, NM_MASK)]
    if len(sparse) != 1:
        raise NmOnnxError(f"internal: site '{module}' has {len(sparse)} NMMask/NMSparseMatMul nodes")
    constants = sorted({v.name for n in nodes for v in n.inputs
                        if v is not None and (v.is_initializer() or v.const_value is not None)})
    return {"output": leaving[0], "nodes": [n.name for n in nodes], "op": sparse[0].op_type,
            "fused": sparse[0].op_type in SPARSE_MATMULS, "constants": constants}


def _record(plan: SitePlan, nodes: list[ir.Node], graph_outputs) -> dict:
    site = plan.site
    quant = site.quant
    fields = node_fields(site.module, nodes, graph_outputs)
    return {
        "module": site.module, "kind": site.kind, "layer": site.layer, "k": site.k, "o": site.o,
        "input": site.input, "output": fields["output"], "nodes": fields["nodes"],
        "op": fields["op"], "fused": fields["fused"],
        "quant": None if quant is None else {"bits": quant.bits, "block_size": quant.block_size,
                                             "symmetric": quant.zero_points is None},
        "n": plan.n, "m": plan.m, "criterion": plan.criterion, "shift": plan.shift,
        "variance_correction": plan.variance_correction, "scale_shift": plan.scale_shift,
        "constants": fields["constants"],
    }


class RecordPass(ir.passes.InPlacePass):
    """Write the site records of `locate.plans` into metadata and the report (graph unchanged)."""

    def __init__(self, locate, report: PassReport):
        super().__init__()
        self.locate = locate
        self.report = report

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_site = nodes_by_site(graph)
        outputs = frozenset(graph.outputs)
        records = [_record(p, by_site.get(p.site.module, []), outputs) for p in self.locate.plans]
        model.metadata_props[SITES_KEY] = json.dumps(records, separators=(",", ":"))
        self.report.records = records
        return ir.passes.PassResult(model, False)
