"""How weights sit in device memory: every field of a quant block gathered into its own plane.

A GGUF block interleaves scales and quants (Q4_K: f16 d | f16 dmin | 12 scale bytes | 128 quant
bytes), and most block sizes (18, 22, 34, 84, 110, 210 bytes) leave rows unaligned. On the device
each field becomes a row-major plane [rows, blocks_per_row * field_bytes], so every plane row starts
16-byte aligned and a warp reads a field of consecutive blocks as one contiguous run. The bits are
the file's; only their order changes. kernels/formats.cuh reads the planes in the order below.

Written against the array API numpy and CuPy share, so it is tested on the CPU with numpy.
"""
from zephyr.quants import GGMLType, TYPE_INFO

T = GGMLType

# type -> ((offset, length) in the block, ...), plane p0 first. Types not listed (F32, F16, BF16)
# have no fields: one plane, the file's bytes.
PLANES = {
    T.Q4_0: ((2, 16), (0, 2)),                              # qs, d
    T.Q4_1: ((4, 16), (0, 4)),                              # qs, (d, m)
    T.Q5_0: ((6, 16), (2, 4), (0, 2)),                      # qs, qh, d
    T.Q5_1: ((8, 16), (4, 4), (0, 4)),                      # qs, qh, (d, m)
    T.Q8_0: ((2, 32), (0, 2)),                              # qs, d
    T.Q2_K: ((16, 64), (0, 16), (80, 4)),                   # qs, scales, (d, dmin)
    T.Q3_K: ((32, 64), (0, 32), (96, 12), (108, 2)),        # qs, hmask, scales, d
    T.Q4_K: ((16, 128), (0, 16)),                           # qs, header (d, dmin, scales)
    T.Q5_K: ((48, 128), (16, 32), (0, 16)),                 # qs, qh, header
    T.Q6_K: ((0, 128), (128, 64), (192, 16), (208, 2)),     # ql, qh, scales, d
}
ALIGN = 256   # bytes between plane starts


def plane_sizes(type: GGMLType, rows: int, cols: int) -> list:
    """Bytes of each plane of a [rows, cols] weight."""
    info = TYPE_INFO[type]
    if type not in PLANES:
        return [rows * cols * info.type_size]
    blocks = rows * (cols // info.block_size)
    return [blocks * length for _offset, length in PLANES[type]]


def plane_offsets(sizes) -> list:
    """Where each plane starts in one buffer: aligned to ALIGN bytes. The last entry is the total."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // ALIGN) * ALIGN
    return offsets + [at]


def pack(xp, raw, type: GGMLType, rows: int, cols: int):
    """raw: uint8 [rows * row_bytes] in the file's block layout (an `xp` array) -> (buffer, planes):
    one uint8 buffer and a view of it per plane."""
    sizes = plane_sizes(type, rows, cols)
    offsets = plane_offsets(sizes)
    buffer = xp.empty(offsets[-1], dtype=xp.uint8)
    if type not in PLANES:
        buffer[:sizes[0]] = raw
        return buffer, [buffer[:sizes[0]]]
    info = TYPE_INFO[type]
    blocks = raw.reshape(-1, info.type_size)
    planes = []
    for (offset, length), start, size in zip(PLANES[type], offsets, sizes):
        plane = buffer[start:start + size]
        plane.reshape(-1, length)[...] = blocks[:, offset:offset + length]
        planes.append(plane)
    return buffer, planes


def unpack(xp, planes, type: GGMLType, rows: int, cols: int):
    """Inverse of pack: the planes -> uint8 [rows * row_bytes] in the file's block layout."""
    info = TYPE_INFO[type]
    if type not in PLANES:
        return planes[0].copy()
    blocks = xp.empty((rows * (cols // info.block_size), info.type_size), dtype=xp.uint8)
    for (offset, length), plane in zip(PLANES[type], planes):
        blocks[:, offset:offset + length] = plane.reshape(-1, length)
    return blocks.reshape(-1)
