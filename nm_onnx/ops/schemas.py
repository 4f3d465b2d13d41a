"""Names and constants of the nm_onnx op set (domain, version, op types, attribute defaults)."""

DOMAIN = "nm_onnx"
OPSET_VERSION = 1

TOKEN_SHIFT = "TokenShift"
NM_MASK = "NMMask"
NM_SPARSE_MATMUL = "NMSparseMatMul"
OP_TYPES = (TOKEN_SHIFT, NM_MASK, NM_SPARSE_MATMUL)

# Attribute defaults (docs/ops.md). n and m have no default.
DEFAULTS = {
    TOKEN_SHIFT: {"mode": "median"},
    NM_MASK: {"criterion": "magnitude"},
    NM_SPARSE_MATMUL: {"shift": "none", "variance_correction": 0},
}
