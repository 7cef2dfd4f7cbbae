"""Dense bit packing of integer weight codes for the quantized checkpoint.

A code q of a b-bit grid [qmin, qmax] (see quantizer.qrange) is stored as the unsigned
u = q - qmin in [0, 2^b - 1]. The codes, in C order, form one little-endian bitstream: bit j
of code i is bit (i·b + j) of the stream, and bit k of the stream is bit (k mod 8) of byte
k // 8. The last byte is zero-padded. n codes take ceil(n·b / 8) bytes; at 8 bits this is
`(q + 128).astype(uint8)`, at 16 bits the little-endian uint16 bytes of q + 32768.
"""
import numpy as np

from .quantizer import check_bits, qrange

# Codes per vectorized step: a multiple of 8, so that every chunk starts on a byte boundary
# (8 codes of b bits are exactly b bytes). Bounds the temporary bit matrix to CHUNK * 16 bytes.
CHUNK = 1 << 20


def packed_nbytes(n, bits):
    """Bytes that n codes of `bits` bits take once packed."""
    return (int(n) * check_bits(bits) + 7) // 8


def pack_codes(codes, bits, signed):
    """Integer codes (any shape, any integer dtype) of the `bits`-bit grid -> 1-D uint8 array of
    packed_nbytes(codes.size, bits) bytes. A code outside [qmin, qmax] is a ValueError."""
    bits = check_bits(bits)
    qmin, qmax = qrange(bits, signed)
    codes = np.asarray(codes)
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"pack_codes: codes must be integers, got {codes.dtype}")
    flat = codes.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < qmin or flat.max() > qmax):
        raise ValueError(f"pack_codes: codes span [{flat.min()}, {flat.max()}], outside the {bits}-bit "
                         f"{'signed' if signed else 'unsigned'} grid [{qmin}, {qmax}]")
    u = (flat - qmin).astype(np.uint32)
    if bits == 8:
        return u.astype(np.uint8)
    if bits == 16:
        return u.astype("<u2").view(np.uint8).copy()
    shifts = np.arange(bits, dtype=np.uint32)
    out = np.empty(packed_nbytes(u.size, bits), np.uint8)
    for start in range(0, u.size, CHUNK):  # chunks of codes, each vectorized
        part = u[start:start + CHUNK]
        bitmat = ((part[:, None] >> shifts) & 1).astype(np.uint8)  # (n, bits), least significant bit first
        packed = np.packbits(bitmat.reshape(-1), bitorder="little")
        offset = start * bits // 8
        out[offset:offset + packed.size] = packed
    return out


def unpack_codes(data, bits, signed, shape):
    """Inverse of pack_codes: uint8 bytes -> int32 codes of the given shape. A byte count other
    than packed_nbytes(prod(shape), bits) is a ValueError."""
    bits = check_bits(bits)
    qmin, _ = qrange(bits, signed)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"unpack_codes: packed data must be uint8, got {data.dtype}")
    data = data.reshape(-1)
    if data.size != packed_nbytes(n, bits):
        raise ValueError(f"unpack_codes: {data.size} bytes for {n} codes of {bits} bits; expected "
                         f"{packed_nbytes(n, bits)}")
    if bits == 8:
        u = data.astype(np.int32)
    elif bits == 16:
        u = data.view("<u2").astype(np.int32)
    else:
        weights = (1 << np.arange(bits, dtype=np.int32))
        u = np.empty(n, np.int32)
        for start in range(0, n, CHUNK):
            count = min(CHUNK, n - start)
            offset = start * bits // 8
            chunk = data[offset:offset + packed_nbytes(count, bits)]
            bitmat = np.unpackbits(chunk, count=count * bits, bitorder="little").reshape(count, bits)
            u[start:start + count] = bitmat.astype(np.int32) @ weights
    return (u + qmin).astype(np.int32).reshape(shape)
