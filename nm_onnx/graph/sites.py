"""The linear-site map: which MatMul of an exported graph is which `nn.Linear` of the model.

A *linear site* is a MatMul whose second input is a constant weight B = W^T of shape [K, O]
(possibly reached through Cast or Transpose, e.g. the tied lm_head that reads a Transpose of the
embedding). Its module path comes from the node name for optimum/TorchScript exports
(`/model/layers.3/mlp/down_proj/MatMul` -> `model.layers.3.mlp.down_proj`) or from the
`pkg.torch.onnx.name_scopes` metadata of torch dynamo exports. This map is the contract between
`inspect`, calibration (module names) and the graph passes (node and value names).

Graphs of ORT GenAI's model builder (producer `onnxruntime-genai`) name their attention scope `attn`
where Hugging Face models say `self_attn` (`/model/layers.0/attn/qkv_proj/MatMul`); the module path
uses the Hugging Face name (`model.layers.0.self_attn.qkv_proj`, as Phi-3's own modules are called), so
recipes' module globs select the same projections in both kinds of export. The builder packs q, k and v
into one MatMul (`qkv_proj`, kind qkv) and, optionally, gate and up (`gate_up_proj`, kind gate_up):
ONE site reading ONE activation, so one mask is shared by the packed projections.

A site may also be a com.microsoft `MatMulNBits` (block-quantized int4/int8 weights, e.g. the builder's
`-p int4` graphs, node `/model/layers.0/attn/qkv_proj/MatMul_Q4`): then `weight` is its packed B
initializer and `quant` says how to read it (bits, block size, scales and zero-point initializers);
the float weight everything downstream computes with is its dequantization (nm_onnx.ops.nbits).
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass

from nm_onnx.genai import PRODUCER as GENAI_PRODUCER
from nm_onnx.recipe import SHARED_INPUT

KINDS = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "lm_head", "other")
PACKED_KINDS = ("qkv", "gate_up")  # one MatMul for several Hugging Face projections (ORT GenAI builds)
# the Hugging Face projections a packed site concatenates, in the order of its output columns
PACKED_MEMBERS = {"qkv": SHARED_INPUT["qkv_proj"], "gate_up": SHARED_INPUT["gate_up_proj"]}
_KIND_BY_NAME = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "qkv_proj": "qkv", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "gate_up_proj": "gate_up", "down_proj": "down", "lm_head": "lm_head",
}
QUANT_DOMAIN = "com.microsoft"
QUANT_OP = "MatMulNBits"
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
_GENAI_ATTN_RE = re.compile(r"^(model\.layers\.\d+)\.attn\.")


@dataclass(frozen=True)
class Quantization:
    """How a MatMulNBits site stores its weight (the node's attributes and constant inputs)."""

    bits: int
    block_size: int
    scales: str  # initializer names
    zero_points: str | None = None
    extra_inputs: tuple[str, ...] = ()  # g_idx / bias inputs, if any (not supported by the sparse op)


@dataclass(frozen=True)
class LinearSite:
    module: str  # model.layers.3.mlp.down_proj
    kind: str  # one of KINDS
    k: int  # input features (reduction axis)
    o: int  # output features
    matmul: str  # MatMul node name
    input: str  # name of the activation value X
    output: str  # name of the MatMul output value
    weight: str  # name of the weight initializer as stored
    transposed: bool  # True when the initializer is stored as W [O, K] and transposed in-graph
    dtype: str  # weight element type as stored, e.g. FLOAT, FLOAT16
    via: tuple[str, ...] = ()  # op types between the initializer and the MatMul (Cast, Transpose)
    bias: str | None = None  # bias initializer of a following Add, if any
    bias_add: str | None = None  # that Add node's name
    layer: int | None = None  # decoder layer index, if any
    quant: Quantization | None = None  # a MatMulNBits site: its weight is block-quantized

    def to_dict(self) -> dict:
        d = asdict(self)
        d["via"] = list(self.via)
        return d


def site_members(module: str, kind: str) -> list[str]:
    """The Hugging Face modules a site computes: [module], or a packed site's projections in column order
    ('model.layers.0.self_attn.qkv_proj' -> [....q_proj, ....k_proj, ....v_proj])."""
    if kind not in PACKED_MEMBERS:
        return [module]
    parent = module.rsplit(".", 1)[0]
    return [f"{parent}.{leaf}" for leaf in PACKED_MEMBERS[kind]]


def module_call(module: str) -> tuple[str, int]:
    """'model.layers.0.mlp.up_proj#1' -> ('model.layers.0.mlp.up_proj', 1): the module path and which of
    its calls a site is (find_linear_sites numbers the repeated calls of one module #1, #2, ...)."""
    base, _, n = module.partition("#")
    return base, int(n) if n.isdigit() else 0


def _module_from_node_name(name: str) -> str | None:
    # "/model/layers.0/mlp/down_proj/MatMul" -> "model.layers.0.mlp.down_proj"
    if not name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p]
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1])


def _module_from_metadata(node) -> str | None:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        seq = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    # torch>=2.6 records full dotted module paths, outermost first, then the op's own name
    # (['', 'model', 'model.layers.0', ..., 'model.layers.0.mlp.down_proj', 'linear_6']):
    # the module is the end of the chain of entries that extend one another.
    path = ""
    for entry in seq:
        if not entry:
            continue
        if not path or entry.startswith(path + "."):
            path = entry
        else:
            break
    return path or None


def module_path(node) -> str | None:
    return _module_from_metadata(node) or _module_from_node_name(node.name or "")


def _trace_weight(value):
    """Follow Cast/Transpose/Identity back to an initializer: (initializer value, [op types], perm)."""
    via: list[str] = []
    transposed = False
    v = value
    for _ in range(4):
        if v.const_value is not None or v.is_initializer():
            return v, tuple(reversed(via)), transposed
        prod = v.producer()
        if prod is None or prod.op_type not in ("Cast", "Transpose", "Identity"):
            return None, (), False
        if prod.op_type == "Transpose":
            perm = prod.attributes.get_ints("perm", None)
            if perm is not None and list(perm) != [1, 0]:
                return None, (), False
            transposed = not transposed
        via.append(prod.op_type)
        v = prod.inputs[0]
        if v is None:
            return None, (), False
    return None, (), False


def _bias_of(matmul):
    out = matmul.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1:
        return None, None
    user = uses[0][0] if isinstance(uses[0], tuple) else uses[0].node
    if user.op_type != "Add":
        return None, None
    other = user.inputs[1] if user.inputs[0] is out else user.inputs[0]
    if other is None:
        return None, None
    other, _, transposed = _trace_weight(other)  # optimum dedups equal tensors through Identity
    if other is None or transposed:
        return None, None
    shape = other.shape
    if shape is None or len(shape) != 1:
        return None, None
    return other.name, user.name


def _constant_name(value) -> str | None:
    return value.name if value is not None and (value.const_value is not None or value.is_initializer()) else None


def _quantized(node):
    """(B initializer, K, N, Quantization) of a MatMulNBits node with constant inputs, else None."""
    a = node.attributes
    init = node.inputs[1] if len(node.inputs) > 1 else None
    scales = _constant_name(node.inputs[2]) if len(node.inputs) > 2 else None
    if _constant_name(init) is None or scales is None:
        return None
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    if zp is not None and _constant_name(zp) is None:
        return None
    extra = tuple(v.name for v in node.inputs[4:] if v is not None)
    q = Quantization(bits=a.get_int("bits", 4), block_size=a.get_int("block_size", 0), scales=scales,
                     zero_points=zp.name if zp is not None else None, extra_inputs=extra)
    return init, a.get_int("K", 0), a.get_int("N", 0), q


def find_linear_sites(model) -> list[LinearSite]:
    """All linear sites of the main graph, in graph order. Duplicated module paths get a #n suffix."""
    sites: list[LinearSite] = []
    seen: dict[str, int] = {}
    genai = getattr(model, "producer_name", None) == GENAI_PRODUCER
    for node in model.graph:
        quant = None
        if node.op_type == QUANT_OP and node.domain == QUANT_DOMAIN:
            found = _quantized(node)
            if found is None:
                continue
            init, k, o, quant = found
            via, transposed = (), False
        elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            init, via, transposed = _trace_weight(node.inputs[1])
            if init is None or init.shape is None or len(init.shape) != 2:
                continue
            rows, cols = (int(d) for d in init.shape)
            k, o = (cols, rows) if transposed else (rows, cols)
        else:
            continue
        module = module_path(node) or node.name or node.outputs[0].name
        if genai:
            module = _GENAI_ATTN_RE.sub(r"\1.self_attn.", module)
        if module in seen:
            seen[module] += 1
            module = f"{module}#{seen[module]}"
        else:
            seen[module] = 0
        leaf = module.rsplit(".", 1)[-1]
        layer = _LAYER_RE.search(module + ".")
        bias, bias_add = _bias_of(node)
        sites.append(
            LinearSite(
                module=module,
                kind=_KIND_BY_NAME.get(leaf, "other"),
                k=k,
                o=o,
                matmul=node.name,
                input=node.inputs[0].name,
                output=node.outputs[0].name,
                weight=init.name,
                transposed=transposed,
                dtype=init.dtype.name if init.dtype is not None else "UNDEFINED",
                via=via,
                bias=bias,
                bias_add=bias_add,
                layer=int(layer.group(1)) if layer else None,
                quant=quant,
            )
        )
    return sites
