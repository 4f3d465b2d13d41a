"""quantize (`transform --quantize int4|int8`): float linear sites -> com.microsoft MatMulNBits, first.

Every float linear site (sparse or dense) gets its weight round-to-nearest block-quantized along K
(nm_onnx.ops.nbits.quantize: the MatMulNBits scheme, block `block_size`, symmetric or with uint8 zero
points) and its MatMul replaced by a MatMulNBits node (named like the builder's: `.../MatMul_Q4`,
the original's metadata kept, so the site keeps its module path). The later passes then treat the
model like a builder int4 graph: sparse sites fuse into NMSparseMatMulNBits over these very quantized
values, dense ones stay MatMulNBits, so a recipe whose sites are all dense gives the dense int4
baseline with bit-identical weights. Dense MatMulNBits nodes use accuracy_level 0 (float32 compute:
what the PyTorch reference simulates; level 4 quantizes activations to int8 and would not match it).

Weights already quantized (MatMulNBits sites) are left as they are. A weight reached through Cast or
Transpose (a tied lm_head reads a Transpose of the embedding) is quantized from the matrix the MatMul
sees; the Cast/Transpose nodes and initializers nothing reads any more are removed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from nm_onnx.errors import NmOnnxError
from nm_onnx.graph.constants import load_weight, release_weight
from nm_onnx.graph.sites import QUANT_DOMAIN, QUANT_OP, find_linear_sites
from nm_onnx.ops import nbits
from nm_onnx.passes.common import activation_dtype, constant

QUANTIZE_CHOICES = {"int4": 4, "int8": 8}
QUANTIZE_KEY = "nm_onnx.quantize"  # model metadata: how transform quantized the float sites


def parse_quantize(value: str | None, block_size: int = 32) -> tuple[int, int] | None:
    """(bits, block size) of a --quantize value, None for None; NmOnnxError for a bad value."""
    if value is None:
        return None
    if value not in QUANTIZE_CHOICES:
        raise NmOnnxError(f"--quantize {value!r} is not supported; use {' or '.join(QUANTIZE_CHOICES)}")
    b = int(block_size)
    if b < 16 or b & (b - 1):
        raise NmOnnxError(f"--quant-block-size {b} must be a power of two >= 16 (the MatMulNBits rule), e.g. 32")
    return QUANTIZE_CHOICES[value], b


class QuantizePass(ir.passes.InPlacePass):
    def __init__(self, bits: int, block_size: int = 32, symmetric: bool = True):
        super().__init__()
        self.bits = nbits.check_bits("--quantize", bits)
        self.block_size = nbits.check_block_size("--quant-block-size", block_size)
        self.symmetric = symmetric

    def describe(self) -> str:
        """The metadata value (QUANTIZE_KEY) of a model this pass quantized (written by the pipeline)."""
        return f"int{self.bits} block {self.block_size} {'symmetric' if self.symmetric else 'asymmetric'} RTN"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from nm_onnx.passes.locate import check_not_transformed

        check_not_transformed(model)
        graph = model.graph
        by_name = {n.name: n for n in graph if n.name}
        weights = []  # the float weight each replaced MatMul read (possibly through Cast/Transpose)
        for site in find_linear_sites(model):
            if site.quant is not None:
                continue
            node = by_name.get(site.matmul)
            if node is None or node.outputs[0].name != site.output:
                node = next(n for n in graph if n.op_type == "MatMul" and n.outputs[0].name == site.output)
            weights.append(node.inputs[1])
            self._replace(model, site, node)
        for value in weights:
            _drop_if_unread(graph, value)
        return ir.passes.PassResult(model, bool(weights))

    def _replace(self, model: ir.Model, site, node: ir.Node) -> None:
        w = load_weight(model, site)  # W [O, K]
        try:
            if not np.isfinite(w).all():
                raise NmOnnxError(f"site '{site.module}': weight '{site.weight}' holds inf/NaN values; it cannot "
                                  "be quantized (fix the checkpoint or exclude the module)")
            q = nbits.quantize(np.asarray(w, dtype=np.float32).T, self.bits, self.block_size, self.symmetric)
        finally:
            del w
            release_weight(model, site)
        dtype = activation_dtype(node)
        suffix = f"Q{self.bits}"

        graph = model.graph
        inputs = [node.inputs[0], constant(graph, site, f"MatMul.weight_{suffix}", q.b, ir.DataType.UINT8),
                  constant(graph, site, "MatMul.weight_scales", q.scales, dtype)]
        if q.zero_points is not None:
            inputs.append(constant(graph, site, "MatMul.weight_zero_points", q.zero_points, ir.DataType.UINT8))
        name = f"{node.name}_{suffix}" if node.name else f"{site.module}/MatMul_{suffix}"
        new = ir.node(QUANT_OP, inputs, domain=QUANT_DOMAIN, name=name,
                      attributes={"K": site.k, "N": site.o, "bits": self.bits, "block_size": self.block_size,
                                  "accuracy_level": 0})
        new.metadata_props.update(node.metadata_props)
        out = node.outputs[0]
        new.outputs[0].type = out.type
        new.outputs[0].shape = out.shape
        graph.insert_before(node, new)
        kept_name = out.name  # the site's output keeps its name (and a graph output its place)
        out.name = f"{kept_name}/dense"
        out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        new.outputs[0].name = kept_name
        graph.remove(node, safe=True)
        model.opset_imports.setdefault(QUANT_DOMAIN, 1)


def _drop_if_unread(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove a replaced weight nothing reads any more: its Cast/Transpose/Identity chain and initializer
    (a tied embedding still read by its Gather stays; nothing else of the graph is touched)."""
    while value is not None and not value.uses() and not value.is_graph_output():
        prod = value.producer()
        if prod is None:
            if value.is_initializer() and not value.is_graph_input():
                del graph.initializers[value.name]
            return
        if prod.op_type not in ("Cast", "Transpose", "Identity") or len(prod.outputs) != 1:
            return
        source = prod.inputs[0]
        graph.remove(prod, safe=True)
        value = source
