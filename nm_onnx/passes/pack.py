"""pack: horizontal fusion of a selection group into one MatMul (recipes with `share_selection`).

With `share_selection` the projections that read one activation (q/k/v, gate/up; their group from
`SparsityRecipe.selection_groups`) choose one mask per token, so they can be one site. This pass,
first in the pipeline, rewrites every such group of separate MatMuls

    Yq = MatMul(X, Bq)   Yk = MatMul(X, Bk)   Yv = MatMul(X, Bv)

into the form ORT GenAI's builder emits

    Y = MatMul(X, concat(Bq, Bk, Bv))  ->  Yq, Yk, Yv = Split(Y, [Oq, Ok, Ov])

named like the builder's packed node (`/model/layers.0/self_attn/qkv_proj/MatMul`), so that
find_linear_sites sees ONE packed site (kind qkv / gate_up) and every later pass, the site records,
validate and bench treat it as they treat a builder's packed site: one NMSparseMatMul, one selection
per token, one weight stream. The members' bias Adds stay after the Split. The old MatMuls and their
weights go (the graph holds each weight once). A group is left as it is, with the reason in the
report, when its members do not all read the same value, are not plain float MatMuls over an
initializer of one dtype (a Cast or Transpose in between, a quantized MatMulNBits), or a member
module is called more than once.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from nm_onnx.errors import NmOnnxError
from nm_onnx.graph.constants import load_weight, release_weight
from nm_onnx.graph.sites import find_linear_sites, module_call
from nm_onnx.passes.common import PassReport, initializer, opset
from nm_onnx.recipe import SHARED_INPUT

NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # dynamo exports' module path metadata (graph.sites)


class PackPass(ir.passes.InPlacePass):
    """Pack each selection group of the recipe (more than one separate MatMul) into one MatMul + Split."""

    def __init__(self, recipe, report: PassReport | None = None):
        super().__init__()
        self.recipe = recipe
        self.report = report if report is not None else PassReport()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from nm_onnx.passes.locate import check_not_transformed, resolve_sites

        check_not_transformed(model)
        sites = find_linear_sites(model)
        by_module = {s.module: s for s in sites}
        settings, k = resolve_sites(self.recipe, sites)  # the errors locate would give, given first
        groups = {g: m for g, m in self.recipe.selection_groups(settings).items() if len(m) > 1}
        by_name = {n.name: n for n in model.graph if n.name}
        reasons = {g: _why_not(g, m, by_module, by_name) for g, m in groups.items()}
        reasons.update(self._resolves_alike(settings, k, {g: m for g, m in groups.items() if not reasons[g]}))
        changed = False
        for group, members in groups.items():
            if reasons[group]:
                self.report.packed[group] = reasons[group]
                continue
            _pack(model, group, [by_module[m] for m in members], by_name)
            self.report.packed[group] = "packed"
            changed = True
        return ir.passes.PassResult(model, changed)

    def _resolves_alike(self, settings, k, groups) -> dict[str, str]:
        """{group: why not} for groups whose packed module the recipe would resolve differently from its
        members (an override naming `*.q_proj` matches no packed site): locate resolves the packed graph."""
        inside = {m for members in groups.values() for m in members}
        after = {m: size for m, size in k.items() if m not in inside}
        after.update({g: k[members[0]] for g, members in groups.items()})
        try:
            packed = self.recipe.resolve(list(after), after)
        except NmOnnxError as e:  # e.g. an override glob names members only
            return {g: f"the recipe resolves differently once packed ({e})" for g in groups}
        return {g: "the recipe gives the packed module another setting than its members (an override names "
                   "members, not the group)" for g, members in groups.items()
                if packed[g].describe() != settings[members[0]].describe()}


def _why_not(group: str, members: list[str], by_module, by_name) -> str:
    """The reason a group cannot be packed, or ''."""
    leaves = tuple(m.rpartition(".")[2] for m in members)
    if leaves != SHARED_INPUT[group.rpartition(".")[2]]:
        return "only some of the group's projections are sparse (a packed site computes all of them)"
    if any(f"{m}#1" in by_module for m in members):
        return "a member module is called more than once"
    sites = [by_module.get(m) for m in members]
    if any(s is None for s in sites):
        return "a member is not a linear site of this graph"
    if len({s.input for s in sites}) != 1:
        return "the members do not read the same value"
    if any(s.quant is not None for s in sites):
        return "quantized (MatMulNBits) members are not packed"
    if any(s.via or s.transposed for s in sites):
        return "a member's weight is reached through Cast/Transpose"
    if len({s.dtype for s in sites}) != 1 or len({s.k for s in sites}) != 1:
        return "the members' weights differ in dtype or K"
    for s in sites:
        node = by_name.get(s.matmul)
        if node is None or node.outputs[0].name != s.output:
            return f"MatMul '{s.matmul}' not found by name"
        if node.inputs[1].is_graph_input() or len(list(node.inputs[1].uses())) != 1:
            return f"the weight '{s.weight}' is read by more than its MatMul"
    return ""


def _packed_node_name(group: str, first_site, first_node: ir.Node) -> str:
    """The member node's name with its module leaf replaced by the group's (`.../q_proj/MatMul` ->
    `.../qkv_proj/MatMul`), or the group's path as a node name."""
    leaf, packed = module_call(first_site.module)[0].rpartition(".")[2], group.rpartition(".")[2]
    name = first_node.name or ""
    if f"/{leaf}/" in name:
        return name.replace(f"/{leaf}/", f"/{packed}/", 1)
    return "/" + group.replace(".", "/") + "/MatMul"


def _pack(model: ir.Model, group: str, sites: list, by_name) -> None:
    graph = model.graph
    nodes = [by_name[s.matmul] for s in sites]
    x = nodes[0].inputs[0]
    weights = []
    try:
        weights = [np.asarray(load_weight(model, s)) for s in sites]  # W [O, K] each
        b = np.ascontiguousarray(np.concatenate(weights, axis=0).T)  # B = [K, sum O]
    finally:
        del weights
        for s in sites:
            release_weight(model, s)
    name = _packed_node_name(group, sites[0], nodes[0])
    prefix = name.rsplit("/", 1)[0]
    w_value = initializer(graph, f"{group}.weight", b, nodes[0].inputs[1].dtype or ir.DataType.FLOAT)
    matmul = ir.node("MatMul", [x, w_value], name=name,
                     outputs=[ir.Value(name=f"{name}_output_0")])
    matmul.metadata_props.update({k: v for k, v in nodes[0].metadata_props.items() if k != NAME_SCOPES})
    if NAME_SCOPES in nodes[0].metadata_props:
        matmul.metadata_props[NAME_SCOPES] = repr([group])
    sizes = [s.o for s in sites]
    split_outputs = [ir.Value(name=f"{prefix}/Split_output_{i}") for i in range(len(sites))]
    if opset(model) >= 13:  # split sizes as an input since opset 13
        sv = initializer(graph, f"{prefix}/split_sizes", np.array(sizes), ir.DataType.INT64)
        split = ir.node("Split", [matmul.outputs[0], sv], attributes={"axis": -1}, name=f"{prefix}/Split",
                        outputs=split_outputs)
    else:
        split = ir.node("Split", [matmul.outputs[0]], attributes={"axis": -1, "split": sizes},
                        name=f"{prefix}/Split", outputs=split_outputs)
    graph.insert_before(nodes[0], [matmul, split])
    for node, out in zip(nodes, split_outputs, strict=True):
        old = node.outputs[0]
        kept = old.name  # the member's output keeps its name (and a graph output its place)
        out.type, out.shape = old.type, old.shape
        old.name = f"{kept}/unpacked"
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        out.name = kept
        weight = node.inputs[1]
        graph.remove(node, safe=True)
        if not weight.uses() and weight.is_initializer():
            del graph.initializers[weight.name]
