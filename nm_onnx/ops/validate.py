"""Static checks of the nm_onnx nodes of a model, before ONNX Runtime sees it.

ORT rejects an unsupported input dtype with a generic type error from deep inside its graph
resolver; `check_model` finds those problems first and raises NmOnnxError naming the node, the op,
the input and the fix. It also checks the node's inputs and attributes (n, m, criterion, shift,
mode, ...). Everything it checks is read from the op table in `schemas.py`.
"""

from __future__ import annotations

import onnx

from nm_onnx.errors import NmOnnxError
from nm_onnx.ops import reference as ref
from nm_onnx.ops.schemas import CPU, CUDA, DOMAIN, DTYPES, SCHEMAS, cast_hint, dtype_name

_ATTRIBUTE_TYPES = {"int": onnx.AttributeProto.INT, "string": onnx.AttributeProto.STRING}


def _known_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown types are not checked
        inferred = model
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _check_inputs(label: str, schema, node: onnx.NodeProto, types: dict, provider: str) -> None:
    names = schema.input_names
    if len(node.input) > len(names):
        raise NmOnnxError(
            f"{label}: the node has {len(node.input)} inputs; {schema.name} takes at most {len(names)} "
            f"({', '.join(names)})"
        )
    for i, spec in enumerate(schema.inputs):
        value = node.input[i] if i < len(node.input) else ""
        if not value:
            if not spec.optional:
                raise NmOnnxError(f"{label}: input {spec.name} is missing; it is required")
            continue
        t = types.get(value)
        if t is not None and spec.dtype is not None:
            if t != spec.dtype:
                want = dtype_name(spec.dtype)
                raise NmOnnxError(
                    f"{label}: input {spec.name} ('{value}') has dtype {dtype_name(t)}; it must be {want} "
                    f"(the quantized weight's layout, nm_onnx.ops.nbits)"
                )
        elif t is not None and t not in DTYPES[provider]:
            raise NmOnnxError(
                f"{label}: input {spec.name} ('{value}') has dtype {dtype_name(t)}; cast it to {cast_hint(provider)}"
            )


def _check_attributes(label: str, schema, node: onnx.NodeProto) -> None:
    given = {}
    for a in node.attribute:
        spec = next((s for s in schema.attributes if s.name == a.name), None)
        if spec is not None and a.type != _ATTRIBUTE_TYPES[spec.type]:
            kind = onnx.AttributeProto.AttributeType.Name(a.type).lower()
            raise NmOnnxError(f"{label}: attribute {a.name} has type {kind}; set it as type {spec.type}")
        given[a.name] = onnx.helper.get_attribute_value(a)
    values = schema.attribute_values(label, given)
    if "n" in values:
        ref.check_pattern(label, values["n"], values["m"])


def graph_nodes(graph: onnx.GraphProto):
    """The nodes of `graph` and, depth first, of its subgraphs (If branches, Loop and Scan bodies)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from graph_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from graph_nodes(g)


def check_model(model: onnx.ModelProto, cuda: bool = False) -> None:
    """Raise NmOnnxError for the first nm_onnx node (subgraphs included) with a bad dtype, input or attribute."""
    types = _known_types(model)
    provider = CUDA if cuda else CPU
    for node in graph_nodes(model.graph):
        if node.domain != DOMAIN:
            continue
        label = f"{node.op_type} (node '{node.name}')"
        schema = SCHEMAS.get(node.op_type)
        if schema is None:
            raise NmOnnxError(f"{label}: unknown nm_onnx op; use {', '.join(SCHEMAS)}")
        _check_inputs(label, schema, node, types, provider)
        _check_attributes(label, schema, node)
