"""finish: make the rewritten model complete and self-describing.

Adds the `nm_onnx` opset import to the model and to every function scope that uses it, attaches the
standard-ONNX decompositions as model-local functions with `--portable` (the model then runs without
the op library), records recipe, calibration digest and nm-onnx version in metadata_props, keeps
ir_version at what the pinned onnxruntime accepts, then runs the onnx checker and shape inference
(both on the graph without weight data, so a 13 GB model is never loaded). The checker sees a
weightless skeleton (initializers as typed inputs: a small external tensor, which ORT GenAI's builder
writes for every weight, is never read), and ONNX Runtime's contrib ops that live in the ONNX domain
(`SimplifiedLayerNormalization` of GenAI graphs), which the onnx checker does not know, are moved to
a private domain in that skeleton only; ONNX Runtime checks them when it loads the model.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from nm_onnx.errors import NmOnnxError
from nm_onnx.ops.schemas import DOMAIN, OPSET_VERSION

MIN_IR_VERSION = 8  # model-local functions
MAX_IR_VERSION = 10  # onnxruntime >= 1.21 reads IR <= 10 (onnx 1.23 would write 14)


def _uses_domain(nodes) -> bool:
    return any(n.domain == DOMAIN for n in nodes)


class FinishPass(ir.passes.InPlacePass):
    def __init__(self, recipe, calibration_digest: str | None = None, portable: bool = False, check: bool = True,
                 quantized: str | None = None):
        super().__init__()
        self.quantized = quantized  # how the quantize pass quantized the float sites, if it ran
        self.recipe = recipe
        self.calibration_digest = calibration_digest
        self.portable = portable
        self.check = check

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from nm_onnx import __version__

        model.opset_imports[DOMAIN] = OPSET_VERSION
        for func in model.functions.values():
            if _uses_domain(func):
                func.opset_imports[DOMAIN] = OPSET_VERSION
        if self.portable:
            self._attach_functions(model)
        meta = model.metadata_props
        meta["nm_onnx.recipe"] = self.recipe.to_json(indent=None)
        meta["nm_onnx.recipe_digest"] = self.recipe.digest()
        meta["nm_onnx.calibration_digest"] = self.calibration_digest or ""
        meta["nm_onnx.version"] = __version__
        meta["nm_onnx.portable"] = "1" if self.portable else "0"
        if self.quantized:
            from nm_onnx.passes.quantize import QUANTIZE_KEY

            meta[QUANTIZE_KEY] = self.quantized
        needed = onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items() if d in ("", "ai.onnx", "ai.onnx.ml")],
            ignore_unknown=True,
        )
        model.ir_version = min(max(needed, MIN_IR_VERSION, min(model.ir_version, MAX_IR_VERSION)), MAX_IR_VERSION)
        if self.check:
            check_skeleton(model)
            common_passes.ShapeInferencePass(strict_mode=False)(model)
        return ir.passes.PassResult(model, True)

    @staticmethod
    def _attach_functions(model: ir.Model) -> None:
        from nm_onnx.ops.functions import ML_DOMAIN, ML_OPSET, NBITS_MIN_OPSET, function_protos
        from nm_onnx.ops.schemas import NM_SPARSE_MATMUL_NBITS

        opset = int(model.opset_imports.get("", 18))
        if opset < NBITS_MIN_OPSET and any(n.op_type == NM_SPARSE_MATMUL_NBITS for n in model.graph):
            raise NmOnnxError(
                f"--portable: the standard-ONNX body of {NM_SPARSE_MATMUL_NBITS} (quantized sites) needs "
                f"default-domain opset >= {NBITS_MIN_OPSET}, and this model imports opset {opset}; re-export "
                f"with --opset {NBITS_MIN_OPSET}, or drop --portable (the op library runs it)"
            )
        for proto in function_protos(opset=opset):
            func = ir.serde.deserialize_function(proto)
            if func.identifier() in model.functions:
                raise NmOnnxError(f"model already defines function {func.identifier()}")
            model.functions[func.identifier()] = func
        model.opset_imports.setdefault(ML_DOMAIN, ML_OPSET)


_UNCHECKED_DOMAIN = "nm_onnx.unchecked"  # ONNX-domain ops unknown to onnx (ORT contrib ops), skeleton only


def check_skeleton(model: ir.Model) -> None:
    """The onnx checker on `model` without its weights (initializers become typed graph inputs)."""
    from onnx import helper

    proto = ir.serde.serialize_model(model)  # external tensors stay references: nothing is read
    g = proto.graph
    consts = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer]
    del g.initializer[:]
    g.input.extend(consts)
    opset = {o.domain: o.version for o in proto.opset_import}.get("", 1)
    unknown = False
    for node in g.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, opset, ""):
            node.domain = _UNCHECKED_DOMAIN
            unknown = True
    if unknown:
        proto.opset_import.append(helper.make_opsetid(_UNCHECKED_DOMAIN, 1))
    onnx.checker.check_model(proto, full_check=False)
