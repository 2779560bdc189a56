"""Triton: packed NF4/FP4 (+ double-quantized scales) -> a dense tensor, in one launch.

The twin is `reference.dequantize_4bit`; with fp32 output the two agree bit for bit, because both
compute code[nibble] * scale in fp32 (one rounding) and cast once, and the nested scale
nested_code[q] * nested_absmax[j] + offset as a multiply then an add (two roundings). A GPU
compiler would contract that into one FMA (one rounding) and break bit-exactness in ~1e-3 of the
blocks, so the dequantize kernel is launched with enable_fp_fusion=False; it costs nothing
measurable (one multiply-add per 64 elements).

The helpers `decode_4bit` / `load_scale` are shared with the matmul and GEMV kernels, which
decode W at arbitrary element indices (any K, including odd K where a byte straddles two rows);
`decode_row_tile` is their fast path when rows of W hold whole quantization blocks.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.utils.weak
import triton
import triton.language as tl

from qlora.kernels.nf4.checks import check_compute_dtype, check_triton_size, check_weight
from qlora.kernels.nf4.packed import Packed4bit
from qlora.kernels.launch import launch


@triton.jit
def load_scale(absmax_ptr, block, mask, nested_absmax_ptr, nested_code_ptr, offset_ptr,
               NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 scale of quantization block `block`; with double quant decoded from its 8-bit code."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested_value = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        nested_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        # The offset comes through a pointer, never .item(): no host sync, CUDA-graph safe.
        offset = tl.load(offset_ptr)
        scale = nested_value * nested_scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def decode_4bit(packed_ptr, index, mask, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 values of W at flat element indices `index` (masked elements decode to 0)."""
    byte = tl.load(packed_ptr + (index >> 1), mask=mask, other=0).to(tl.int32)
    # Element 2i is the HIGH nibble of byte i (bitsandbytes' packing order).
    nibble = (byte >> ((1 - (index & 1)) * 4)) & 15
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    scale = load_scale(absmax_ptr, index // BLOCKSIZE, mask, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                       NESTED_BLOCKSIZE, DOUBLE_QUANT)
    return value * scale


@triton.jit
def decode_row_tile(packed_ptr, rows, row_mask, col0, IN_FEATURES, absmax_ptr, code_ptr, nested_absmax_ptr,
                    nested_code_ptr, offset_ptr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 W[rows, col0 : col0 + COLS] from whole bytes and whole quantization blocks.

    Needs IN_FEATURES % BLOCKSIZE == 0, col0 % BLOCKSIZE == 0 and COLS % BLOCKSIZE == 0: every
    row then starts on a byte and on a block, so a row's bytes are one contiguous run (vector loads,
    each byte read once for its two nibbles) and the tile's scales are COLS / BLOCKSIZE per row
    rather than one load chain per element as in decode_4bit. Elements past the edges decode to
    finite values (scale 0, or the offset): callers mask them out of products and stores.
    """
    HALF: tl.constexpr = COLS // 2
    BLOCKS: tl.constexpr = COLS // BLOCKSIZE
    byte_cols = col0 // 2 + tl.arange(0, HALF)
    byte_mask = row_mask[:, None] & (byte_cols < IN_FEATURES // 2)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * (IN_FEATURES // 2) + byte_cols[None, :], mask=byte_mask,
                   other=0).to(tl.int32)
    values = tl.interleave(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 15)))  # high nibble first
    block_cols = col0 // BLOCKSIZE + tl.arange(0, BLOCKS)
    blocks_per_row = IN_FEATURES // BLOCKSIZE
    scale = load_scale(absmax_ptr, rows[:, None] * blocks_per_row + block_cols[None, :],
                       row_mask[:, None] & (block_cols < blocks_per_row)[None, :], nested_absmax_ptr, nested_code_ptr,
                       offset_ptr, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    values = tl.reshape(values, (values.shape[0], BLOCKS, BLOCKSIZE)) * scale[:, :, None]
    return tl.reshape(values, (values.shape[0], COLS))


@triton.jit
def load_row_tile(packed_ptr, rows, row_mask, col0, IN_FEATURES, absmax_ptr, nested_absmax_ptr,
                  COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                  DOUBLE_QUANT: tl.constexpr):
    """The DRAM half of decode_row_tile (what a pipelined loop may issue ahead of its decode):
    (bytes int32 [rows, COLS / 2], absmax as stored [rows, COLS / BLOCKSIZE], nested absmax (DQ) of
    the same blocks). Same layout conditions as decode_row_tile; masked rows load zeros."""
    HALF: tl.constexpr = COLS // 2
    BLOCKS: tl.constexpr = COLS // BLOCKSIZE
    byte_cols = col0 // 2 + tl.arange(0, HALF)
    byte_mask = row_mask[:, None] & (byte_cols < IN_FEATURES // 2)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * (IN_FEATURES // 2) + byte_cols[None, :], mask=byte_mask,
                   other=0).to(tl.int32)
    block_cols = col0 // BLOCKSIZE + tl.arange(0, BLOCKS)
    blocks_per_row = IN_FEATURES // BLOCKSIZE
    block = rows[:, None] * blocks_per_row + block_cols[None, :]
    block_mask = row_mask[:, None] & (block_cols < blocks_per_row)[None, :]
    if DOUBLE_QUANT:
        absmax = tl.load(absmax_ptr + block, mask=block_mask, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=block_mask, other=0.0)
    else:
        absmax = tl.load(absmax_ptr + block, mask=block_mask, other=0.0).to(tl.float32)
        nested_scale = absmax
    return byte, absmax, nested_scale


@triton.jit
def decode_loaded_row_tile(byte, absmax, nested_scale, pairs_ptr, nested_code_ptr, offset_ptr,
                           COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 W tile from load_row_tile's registers, bit for bit decode_row_tile's values.

    The nibbles decode through code_pairs' 256-entry table: one 8-byte gather per byte gives both
    fp32 code values, where two 4-byte gathers and their nibble extraction took ~7 integer
    instructions per byte in the sm_90 GEMV loop (80 LEA + 51 PRMT for 32 weights a thread).
    """
    BLOCKS: tl.constexpr = COLS // BLOCKSIZE
    pair = tl.load(pairs_ptr + byte)  # the table is 2 KB: L1-resident after the first trips
    high = pair.to(tl.int32).to(tl.float32, bitcast=True)  # element 2i: the high nibble, low word
    low = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    values = tl.interleave(high, low)
    if DOUBLE_QUANT:
        scale = tl.load(nested_code_ptr + absmax) * nested_scale + tl.load(offset_ptr)
    else:
        scale = absmax
    values = tl.reshape(values, (values.shape[0], BLOCKS, BLOCKSIZE)) * scale[:, :, None]
    return tl.reshape(values, (values.shape[0], COLS))


@triton.jit
def decode_row_tile_pairs(packed_ptr, rows, row_mask, col0, IN_FEATURES, absmax_ptr, pairs_ptr, nested_absmax_ptr,
                          nested_code_ptr, offset_ptr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                          NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """decode_row_tile's values through code_pairs' table (`pairs_ptr`): load, then decode, in one trip."""
    byte, absmax, nested_scale = load_row_tile(packed_ptr, rows, row_mask, col0, IN_FEATURES, absmax_ptr,
                                               nested_absmax_ptr, COLS, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    return decode_loaded_row_tile(byte, absmax, nested_scale, pairs_ptr, nested_code_ptr, offset_ptr, COLS, BLOCKSIZE,
                                  DOUBLE_QUANT)


_CODE_PAIRS = torch.utils.weak.WeakTensorKeyDictionary()


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: entry b holds the fp32 bits of code[b >> 4] in its low word and of code[b & 15]
    in its high word (little-endian), so one 8-byte load decodes a whole packed byte. Built once per
    code tensor and device (and again if the tensor is modified in place): a decode step captured in
    a CUDA graph after the first call launches nothing extra."""
    cached = _CODE_PAIRS.get(code)
    if cached is not None and cached[0] == code._version:
        return cached[1]
    index = torch.arange(256, device=code.device)
    table = torch.stack([code.float()[index >> 4], code.float()[index & 15]], dim=1).contiguous().view(torch.int64)
    table = table.reshape(256)
    _CODE_PAIRS[code] = (code._version, table)
    return table


# Tiles span at least one quantization block along W's rows; past 256 the tiles would not fit in
# registers, and such weights take decode_4bit's per-element path instead.
MAX_TILE_BLOCKSIZE = 256


def whole_block_tiles(shape: Sequence[int], blocksize: int) -> bool:
    """decode_row_tile applies: rows of W hold whole blocks, small enough to be one tile's columns."""
    return shape[1] % blocksize == 0 and blocksize <= MAX_TILE_BLOCKSIZE


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, out_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, numel,
    packed_bytes, num_blocks,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    ELEMENTS: tl.constexpr,
):
    # ELEMENTS is a multiple of BLOCKSIZE (both powers of two, ELEMENTS >= BLOCKSIZE), so a program
    # holds whole quantization blocks: one scale load per block instead of one per element.
    BYTES: tl.constexpr = ELEMENTS // 2
    BLOCKS: tl.constexpr = ELEMENTS // BLOCKSIZE
    # int64: numel may be up to 2**31 - 1, and the last program's pid * ELEMENTS + ELEMENTS - 1
    # would wrap to a negative index that passes `element < numel`. The bounds (numel + 1) // 2
    # and the block count come from the host for the same reason.
    pid = tl.program_id(0).to(tl.int64)
    first_byte = pid * BYTES
    byte_offsets = first_byte + tl.arange(0, BYTES)
    byte = tl.load(packed_ptr + byte_offsets, mask=byte_offsets < packed_bytes, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4))
    low = tl.load(code_ptr + (byte & 15))
    values = tl.reshape(tl.interleave(high, low), (BLOCKS, BLOCKSIZE))  # high nibble first
    block = pid * BLOCKS + tl.arange(0, BLOCKS)
    scale = load_scale(absmax_ptr, block, block < num_blocks, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                       NESTED_BLOCKSIZE, DOUBLE_QUANT)
    out = values * scale[:, None]
    element = pid * ELEMENTS + tl.reshape(tl.arange(0, ELEMENTS), (BLOCKS, BLOCKSIZE))
    tl.store(out_ptr + element, out.to(out_ptr.dtype.element_ty), mask=element < numel)


def weight_pointers(weight: Packed4bit):
    """Kernel arguments: packed as uint8 bytes, absmax as the kernel reads it, dummies for absent DQ tensors."""
    packed, absmax = weight.packed, weight.absmax
    # A float storage dtype is only reinterpreted as bytes; converting would canonicalise NaN patterns.
    packed = packed.contiguous().view(torch.uint8).reshape(-1) if packed.dtype != torch.uint8 else packed.reshape(-1)
    if not weight.double_quant:
        if absmax.dtype != torch.float32:
            absmax = absmax.float()  # exact: fp16/bf16 values are fp32 values; the interpreter cannot load bf16
        return packed, absmax.contiguous(), absmax, absmax, absmax, False  # DQ pointers never read
    return (packed, absmax.contiguous(), weight.nested_absmax.contiguous(), weight.nested_code.contiguous(),
            weight.offset.reshape(1), True)


def dequantize_elements(blocksize: int) -> int:
    # 1024 elements (512 bytes in, 2-4 KB out) per program: 16K programs for a 4096x4096 weight, enough
    # to fill 132 SMs several times over. To be tuned on H100.
    return max(1024, blocksize)


def dequantize_4bit_triton(weight: Packed4bit, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton twin of reference.dequantize_4bit_torch; `out` (contiguous, [out, in], `dtype`) may be preallocated."""
    check_weight(weight)
    check_compute_dtype(dtype, "dequantize_4bit's output dtype")
    shape = tuple(weight.shape)
    check_triton_size(shape)
    numel = math.prod(shape)
    device = weight.device
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {list(shape)} {dtype} tensor on {device}, "
                         f"got {list(out.shape)} {out.dtype} on {out.device}")
    packed, absmax, nested_absmax, nested_code, offset, double_quant = weight_pointers(weight)
    elements = dequantize_elements(weight.blocksize)
    launch(
        _dequantize_4bit_kernel, (triton.cdiv(numel, elements),),
        packed, out, absmax, weight.code.contiguous(), nested_absmax, nested_code, offset, numel,
        (numel + 1) // 2, triton.cdiv(numel, weight.blocksize), BLOCKSIZE=weight.blocksize, NESTED_BLOCKSIZE=weight.nested_blocksize, DOUBLE_QUANT=double_quant,
        ELEMENTS=elements, enable_fp_fusion=False,
    )
    return out
