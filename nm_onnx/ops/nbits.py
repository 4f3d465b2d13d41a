"""Block-quantized weights: ORT's MatMulNBits layout, NMSparseMatMulNBits' K-major layout, and the map.

MatMulNBits (com.microsoft) stores B column-blocked along K: uint8 [N, K/block, block*bits/8] (4-bit:
the low nibble holds the even k), scales [N, K/block] (or flat), optional uint8 zero points packed
along the block axis ([N, ceil(K/block * bits / 8)], low nibble = even block), default 2^(bits-1).
The bytes of one input row k are scattered over all N columns, so a kernel that reads only the kept
rows of an N:M-sparse activation needs the transpose: NMSparseMatMulNBits takes

    B            uint8 [K, ceil(O*bits/8)]          row k = q[k, 0..O), 4-bit: column 2j in the low
                                                    nibble of byte j, 2j+1 in the high nibble
    scales       float32 [ceil(K/block), O]         row b = the scales of K-block b
    zero_points  uint8 [ceil(K/block), ceil(O*bits/8)], packed like a row of B (optional)

and dequantizes W[k, o] = (q[k, o] - zp[k // block, o]) * scales[k // block, o] in float32. The
re-layout moves the same quantized values, zero points and scales (float16 scales become float32,
exactly), so the sparse op and its dense MatMulNBits source compute with bit-identical weights.
`quantize` is round-to-nearest in the same scheme (blocks along K), for float weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nm_onnx.errors import NmOnnxError

BITS = (4, 8)


def default_zero_point(bits: int) -> int:
    """The zero point of a block without explicit zero points: 2^(bits-1) (8 for int4)."""
    return 1 << (bits - 1)


def n_blocks(k: int, block_size: int) -> int:
    return -(-int(k) // int(block_size))


def packed_width(o: int, bits: int) -> int:
    """Bytes of one packed row of O values."""
    return -(-int(o) * int(bits) // 8)


def check_block_size(label: str, block_size: int) -> int:
    b = int(block_size)
    if b < 16 or b & (b - 1):
        raise NmOnnxError(
            f"{label}: attribute block_size={b} must be a power of two >= 16 (the MatMulNBits rule), e.g. 32"
        )
    return b


def check_bits(label: str, bits: int) -> int:
    if int(bits) not in BITS:
        raise NmOnnxError(f"{label}: attribute bits={bits} must be 4 or 8")
    return int(bits)


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values q [R, O] (each < 2^bits) packed per row: [R, ceil(O*bits/8)]."""
    q = np.asarray(q, dtype=np.uint8)
    if bits == 8:
        return q.copy()
    r, o = q.shape
    if o % 2:
        q = np.concatenate([q, np.zeros((r, 1), np.uint8)], axis=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_rows(packed: np.ndarray, o: int, bits: int) -> np.ndarray:
    """The inverse of pack_rows: uint8 [R, O]."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[:, :o].copy()
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out[:, :o]


@dataclass
class KMajor:
    """A weight in NMSparseMatMulNBits' layout (the op's inputs B, scales, zero_points)."""

    b: np.ndarray  # uint8 [K, ceil(O*bits/8)]
    scales: np.ndarray  # float32 [ceil(K/block), O]
    zero_points: np.ndarray | None  # uint8 [ceil(K/block), ceil(O*bits/8)] or None (2^(bits-1))
    k: int
    o: int
    bits: int
    block_size: int

    def values(self) -> np.ndarray:
        """The quantized values q, uint8 [K, O]."""
        return unpack_rows(self.b, self.o, self.bits)

    def zero_point_values(self) -> np.ndarray:
        """The zero points, uint8 [ceil(K/block), O] (the default when absent)."""
        if self.zero_points is None:
            return np.full((n_blocks(self.k, self.block_size), self.o), default_zero_point(self.bits), np.uint8)
        return unpack_rows(self.zero_points, self.o, self.bits)

    def dequantize(self) -> np.ndarray:
        """W^T as float32 [K, O]: (q - zp) * scale of each k's block."""
        rows = np.arange(self.k) // self.block_size
        q = self.values().astype(np.float32)
        zp = self.zero_point_values().astype(np.float32)[rows]
        return (q - zp) * self.scales.astype(np.float32)[rows]


def check_kmajor(label: str, b, scales, zero_points, k: int, bits: int, block_size: int) -> int:
    """Shape and dtype checks of the op's quantized inputs for X with K features; returns O."""
    scales = np.asarray(scales)
    kb = n_blocks(k, block_size)
    if scales.dtype != np.float32 or scales.ndim != 2 or scales.shape[0] != kb:
        raise NmOnnxError(
            f"{label}: input scales has shape {list(scales.shape)} and dtype {scales.dtype}; it must be float32 "
            f"[ceil(K/block_size), O] = [{kb}, O] (K={k}, block_size={block_size})"
        )
    o = int(scales.shape[1])
    width = packed_width(o, bits)
    b = np.asarray(b)
    if b.dtype != np.uint8 or tuple(b.shape) != (k, width):
        raise NmOnnxError(
            f"{label}: input B has shape {list(b.shape)} and dtype {b.dtype}; it must be uint8 [K, ceil(O*bits/8)] "
            f"= [{k}, {width}] (the K-major quantized weight, nm_onnx.ops.nbits)"
        )
    if zero_points is not None:
        zp = np.asarray(zero_points)
        if zp.dtype != np.uint8 or tuple(zp.shape) != (kb, width):
            raise NmOnnxError(
                f"{label}: input zero_points has shape {list(zp.shape)} and dtype {zp.dtype}; it must be uint8 "
                f"[ceil(K/block_size), ceil(O*bits/8)] = [{kb}, {width}]"
            )
    return o


# ------------------------------------------------------------------------------------- MatMulNBits
@dataclass
class MatMulNBitsWeight:
    """The constant inputs and attributes of one com.microsoft MatMulNBits node."""

    b: np.ndarray  # uint8 [N, K/block, block*bits/8] (any shape with that many bytes)
    scales: np.ndarray  # float [N * K/block] or [N, K/block]
    zero_points: np.ndarray | None  # uint8 packed along blocks, or None
    k: int
    n: int
    bits: int
    block_size: int

    def check(self, label: str) -> None:
        check_bits(label, self.bits)
        check_block_size(label, self.block_size)
        kb = n_blocks(self.k, self.block_size)
        blob = self.block_size * self.bits // 8
        if self.b.size != self.n * kb * blob or self.b.dtype != np.uint8:
            raise NmOnnxError(f"{label}: B has {self.b.size} {self.b.dtype} values, expected uint8 N*blocks*blob = "
                              f"{self.n}*{kb}*{blob}")
        if self.scales.size != self.n * kb:
            raise NmOnnxError(f"{label}: scales has {self.scales.size} values, expected N*blocks = {self.n * kb}")
        if self.zero_points is not None:
            if self.zero_points.dtype != np.uint8:
                raise NmOnnxError(
                    f"{label}: zero_points of dtype {self.zero_points.dtype} (float zero points) are not supported; "
                    "quantize with uint8 zero points (symmetric or asymmetric)"
                )
            if self.zero_points.size != self.n * packed_width(kb, self.bits):
                raise NmOnnxError(f"{label}: zero_points has {self.zero_points.size} bytes, expected "
                                  f"{self.n * packed_width(kb, self.bits)}")

    def values(self) -> np.ndarray:
        """q as uint8 [K, N] (the padding of a last partial block dropped)."""
        kb = n_blocks(self.k, self.block_size)
        blocks = self.b.reshape(self.n, kb, -1)
        if self.bits == 4:
            q = np.empty((self.n, kb, self.block_size), np.uint8)
            q[..., 0::2] = blocks & 0x0F
            q[..., 1::2] = blocks >> 4
        else:
            q = blocks
        return np.ascontiguousarray(q.reshape(self.n, kb * self.block_size)[:, : self.k].T)

    def zero_point_values(self) -> np.ndarray | None:
        """Zero points as uint8 [K/block, N], or None."""
        if self.zero_points is None:
            return None
        kb = n_blocks(self.k, self.block_size)
        return np.ascontiguousarray(unpack_rows(self.zero_points.reshape(self.n, -1), kb, self.bits).T)

    def scale_values(self) -> np.ndarray:
        """Scales as float32 [K/block, N] (float16 converted exactly)."""
        kb = n_blocks(self.k, self.block_size)
        return np.ascontiguousarray(self.scales.astype(np.float32).reshape(self.n, kb).T)

    def dequantize(self) -> np.ndarray:
        """W^T float32 [K, N], by MatMulNBits' own definition on its layout."""
        rows = np.arange(self.k) // self.block_size
        zp = self.zero_point_values()
        zp = (np.float32(default_zero_point(self.bits)) if zp is None else zp.astype(np.float32)[rows])
        return (self.values().astype(np.float32) - zp) * self.scale_values()[rows]

    def to_kmajor(self) -> KMajor:
        """The same quantized values, zero points and scales in NMSparseMatMulNBits' layout."""
        zp = self.zero_point_values()
        return KMajor(
            b=pack_rows(self.values(), self.bits),
            scales=self.scale_values(),
            zero_points=None if zp is None else pack_rows(zp, self.bits),
            k=self.k, o=self.n, bits=self.bits, block_size=self.block_size,
        )


def quantize(w_kn: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = True) -> MatMulNBitsWeight:
    """Round-to-nearest block quantization of W^T [K, N] (blocks along K) in MatMulNBits' layout.

    Symmetric (no zero points; zp = 2^(bits-1)): scale = w_extreme / -2^(bits-1), the block's value
    of largest magnitude mapping to q = 0, as ORT's MLAS quantizer does. Asymmetric: scale =
    (max - min) / (2^bits - 1) over the block (range widened to hold 0), zp = round(-min / scale).
    q = clamp(round(w / scale) + zp, 0, 2^bits - 1).
    """
    w = np.asarray(w_kn, dtype=np.float32)
    k, n = w.shape
    kb = n_blocks(k, block_size)
    pad = np.zeros((kb * block_size, n), np.float32)
    pad[:k] = w
    blocks = pad.reshape(kb, block_size, n)
    qmax = (1 << bits) - 1
    if symmetric:
        # the value of largest magnitude maps to -2^(bits-1) (MLAS' symmetric rule)
        idx = np.abs(blocks).argmax(axis=1)
        extreme = np.take_along_axis(blocks, idx[:, None, :], axis=1)[:, 0, :]
        scale = extreme / np.float32(-(1 << (bits - 1)))
        zp = np.full((kb, n), default_zero_point(bits), np.float32)
    else:
        lo = np.minimum(blocks.min(axis=1), 0)
        hi = np.maximum(blocks.max(axis=1), 0)
        scale = (hi - lo) / np.float32(qmax)
        zp = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, qmax)
    safe = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    q = np.clip(np.round(blocks / safe[:, None, :]) + zp[:, None, :], 0, qmax).astype(np.uint8)
    q_nk = q.reshape(kb * block_size, n).T  # [N, padded K]
    if bits == 4:
        b = (q_nk[:, 0::2] | (q_nk[:, 1::2] << 4)).astype(np.uint8)
    else:
        b = q_nk.copy()
    b = b.reshape(n, kb, block_size * bits // 8)
    zps = None if symmetric else pack_rows(zp.astype(np.uint8).T, bits).reshape(-1)
    return MatMulNBitsWeight(b=b, scales=scale.T.astype(np.float32).reshape(-1), zero_points=zps, k=k, n=n,
                             bits=bits, block_size=block_size)
