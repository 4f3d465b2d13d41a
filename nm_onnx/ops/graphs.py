"""Single-node ONNX models of the nm_onnx ops (tests, benchmarks, examples).

`op_model("NMMask", ["X", "channel_scale"], ["Y"], np.float32, n=2, m=4)` builds a model with one
nm_onnx node, untyped-shape inputs, and (with `functions=True`) the standard-ONNX function bodies
attached as model-local functions, i.e. the `--portable` form.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from nm_onnx.ops.schemas import DOMAIN, OPSET_VERSION, SCHEMAS

DEFAULT_OPSET = 18
IR_VERSION = 10  # onnxruntime 1.21 reads IR <= 10


def op_model(
    op_type: str,
    inputs: list[str],
    outputs: list[str],
    dtype=np.float32,
    opset: int = DEFAULT_OPSET,
    functions: bool = False,
    **attrs,
) -> onnx.ModelProto:
    """One `op_type` node; "" in `inputs` marks an omitted optional input.

    Inputs are typed `dtype`, except those the op table gives a fixed type (e.g. a quantized weight).
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    specs = SCHEMAS[op_type].inputs if op_type in SCHEMAS else ()
    fixed = [spec.dtype for spec in specs] + [None] * max(0, len(inputs) - len(specs))
    node = helper.make_node(op_type, inputs, outputs, domain=DOMAIN, name=f"{op_type}_0", **attrs)
    graph = helper.make_graph(
        [node],
        f"{op_type}_model",
        [helper.make_tensor_value_info(name, t or elem, None) for name, t in zip(inputs, fixed) if name],
        [helper.make_tensor_value_info(name, elem, None) for name in outputs],
    )
    imports = [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    model = helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION)
    if functions:
        from nm_onnx.ops.functions import ML_DOMAIN, ML_OPSET, function_protos

        model.opset_import.append(helper.make_opsetid(ML_DOMAIN, ML_OPSET))
        model.functions.extend(function_protos(opset=opset))
    return model
