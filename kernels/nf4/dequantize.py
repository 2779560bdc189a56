"""Triton: packed NF4/FP4 (+ double-quantized scales) -> a dense tensor, in one launch.

The twin is `reference.dequantize_4bit`; with fp32 output the two agree bit for bit, because both
compute code[nibble] * scale in fp32 (one rounding) and cast once, and the nested scale
nested_code[q] * nested_absmax[j] + offset as a multiply then an add (two roundings). A GPU
compiler would contract that into one FMA (one rounding) and break bit-exactness in ~1e-3 of the
blocks, so the dequantize kernel is launched with enable_fp_fusion=False; it costs nothing
measurable (one multiply-add per 64 elements).

The helpers `decode_4bit` / `load_scale` are shared with the matmul and GEMV kernels, which
decode W at arbitrary element indices (any K, including odd K where a byte straddles two rows);
`decode_row_tile` (forward tiles, read as 32-bit words) and `decode_row_tile_bytes` (backward
tiles) are their fast paths when rows of W hold whole quantization blocks. Row tiles look codes up
in a 16-entry fp32 table (64 B, one L1 line per warp's lookup); a 256-entry table of code pairs
issued fewer instructions but spread each warp's lookups over ~14 lines, and the machine-code model
found its L1 traffic the bound of every kernel that used it (docs/kernels.md).
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
def lookup_code(code_ptr, offset):
    """The fp32 code at byte `offset` (4 x a nibble, int32 in 0..60) of a 64-byte-aligned table.

    The table's address is OR-ed with the offset rather than added: with the low 6 bits of the
    base zero the two agree, and the OR is one 32-bit logic op on the address's low word where a
    pointer add is a 64-bit add with carry (LEA + LEA.HI.X per lookup in the sm_90 SASS)."""
    address = code_ptr.to(tl.int64, bitcast=True) | offset.to(tl.int64)
    return tl.load(address.to(tl.pointer_type(tl.float32), bitcast=True))


@triton.jit
def scale_row_tile(values, rows, row_mask, col0, IN_FEATURES, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                   COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                   DOUBLE_QUANT: tl.constexpr):
    """A row tile's code values [rows, COLS] times their blocks' scales, COLS / BLOCKSIZE per row
    (the row tile decoders' common last step)."""
    BLOCKS: tl.constexpr = COLS // BLOCKSIZE
    block_cols = col0 // BLOCKSIZE + tl.arange(0, BLOCKS)
    blocks_per_row = IN_FEATURES // BLOCKSIZE
    scale = load_scale(absmax_ptr, rows[:, None] * blocks_per_row + block_cols[None, :],
                       row_mask[:, None] & (block_cols < blocks_per_row)[None, :], nested_absmax_ptr, nested_code_ptr,
                       offset_ptr, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    values = tl.reshape(values, (values.shape[0], BLOCKS, BLOCKSIZE)) * scale[:, :, None]
    return tl.reshape(values, (values.shape[0], COLS))


@triton.jit
def decode_row_tile_bytes(packed_ptr, rows, row_mask, col0, IN_FEATURES, absmax_ptr, code_ptr, nested_absmax_ptr,
                          nested_code_ptr, offset_ptr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                          NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """decode_row_tile's values from bytes rather than words, each nibble's code by a pointer add:
    more integer work per byte, but fewer registers (the OR-ed addresses keep a copy of the table's
    high address word per lookup). Backward tiles that the word decode does not suit take it: the
    fused kernel's at blocksize 256 or with fp32 products spilled 8-224 B on sm_90 with the words or
    the OR-ed lookups, and the GEMV's Llama-3-8B layer at M = 1 was 0.82x bf16 with the word decode
    against 0.95x with this one (the machine-code model, H100)."""
    HALF: tl.constexpr = COLS // 2
    byte_cols = col0 // 2 + tl.arange(0, HALF)
    byte_mask = row_mask[:, None] & (byte_cols < IN_FEATURES // 2)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * (IN_FEATURES // 2) + byte_cols[None, :], mask=byte_mask,
                   other=0).to(tl.int32)
    values = tl.interleave(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 15)))  # high nibble first
    return scale_row_tile(values, rows, row_mask, col0, IN_FEATURES, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                          offset_ptr, COLS, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)


@triton.jit
def decode_row_tile(packed_ptr, rows, row_mask, col0, IN_FEATURES, absmax_ptr, code_ptr, nested_absmax_ptr,
                    nested_code_ptr, offset_ptr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 W[rows, col0 : col0 + COLS] from whole 32-bit words and whole quantization blocks.

    Needs IN_FEATURES % BLOCKSIZE == 0, col0 % BLOCKSIZE == 0, COLS % BLOCKSIZE == 0 (so every row
    starts on a word and on a block: a row's bytes are one contiguous run of words, each read once
    for its eight nibbles, and the tile's scales are COLS / BLOCKSIZE per row), a 4-byte-aligned
    packed tensor and a 64-byte-aligned code table (aligned_code). Each nibble's table offset is
    one shift and one mask of its word: extracting bytes first cost a PRMT, a redundant mask and two
    shifts per byte in the sm_90 SASS. Elements past the edges decode to finite values (scale 0, or
    the offset): callers mask them out of products and stores.
    """
    WORDS: tl.constexpr = COLS // 8
    words_per_row = IN_FEATURES // 8
    word_cols = col0 // 8 + tl.arange(0, WORDS)
    word = tl.load(packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + rows[:, None] * words_per_row
                   + word_cols[None, :], mask=row_mask[:, None] & (word_cols < words_per_row)[None, :], other=0)
    # Byte k of a word holds elements 2k (high nibble, bits 8k+4..8k+7) and 2k+1 (low nibble);
    # 4 x a nibble at bit b is (word >> (b - 2)) & 60. Arithmetic shifts are fine: the mask drops
    # every copied sign bit but the nibble's own.
    pair0 = tl.join(lookup_code(code_ptr, (word >> 2) & 60), lookup_code(code_ptr, (word << 2) & 60))
    pair1 = tl.join(lookup_code(code_ptr, (word >> 10) & 60), lookup_code(code_ptr, (word >> 6) & 60))
    pair2 = tl.join(lookup_code(code_ptr, (word >> 18) & 60), lookup_code(code_ptr, (word >> 14) & 60))
    pair3 = tl.join(lookup_code(code_ptr, (word >> 26) & 60), lookup_code(code_ptr, (word >> 22) & 60))
    # [rows, WORDS, nibble of the byte, byte & 1, byte >> 1] -> element order 8 w + 2 k + nibble
    values = tl.join(tl.join(pair0, pair1), tl.join(pair2, pair3))
    values = tl.reshape(tl.permute(values, (0, 1, 4, 3, 2)), (values.shape[0], COLS))
    return scale_row_tile(values, rows, row_mask, col0, IN_FEATURES, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                          offset_ptr, COLS, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)


_ALIGNED_CODE = torch.utils.weak.WeakTensorKeyDictionary()
CODE_ALIGNMENT = 64  # bytes: lookup_code ORs nibble offsets (0..60) into the table's address


def aligned_code(code: torch.Tensor) -> torch.Tensor:
    """The 16 fp32 codes at a 64-byte-aligned address, as lookup_code needs: the tensor itself when it
    is, else a copy made once per code tensor (and again if it is modified in place), so a decode step
    captured in a CUDA graph after the first call launches nothing extra."""
    if code.dtype == torch.float32 and code.is_contiguous() and code.data_ptr() % CODE_ALIGNMENT == 0:
        return code
    cached = _ALIGNED_CODE.get(code)
    if cached is not None and cached[0] == code._version:
        return cached[1]
    # An allocation of its own: torch's allocators align every block to at least 64 bytes.
    copy = torch.empty(16, dtype=torch.float32, device=code.device).copy_(code.reshape(16))
    if copy.data_ptr() % CODE_ALIGNMENT:
        raise RuntimeError(f"could not place the 4-bit code table at a {CODE_ALIGNMENT}-byte-aligned address")
    _ALIGNED_CODE[code] = (code._version, copy)
    return copy


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


def word_aligned(packed: torch.Tensor) -> torch.Tensor:
    """`packed` (bytes, 1-D or one row per expert), or a contiguous copy where it does not start, or
    its rows do not step, on a 32-bit word: decode_row_tile reads the bytes as words. Never one of
    our own weights, whose storage starts aligned and whose rows hold whole blocks: a view that
    starts mid-word."""
    if packed.data_ptr() % 4 or (packed.dim() > 1 and packed.stride(0) % 4):
        return packed.clone(memory_format=torch.contiguous_format)
    return packed


def weight_pointers(weight: Packed4bit):
    """Kernel arguments: packed as uint8 bytes, absmax as the kernel reads it, dummies for absent DQ tensors."""
    packed, absmax = weight.packed, weight.absmax
    # A float storage dtype is only reinterpreted as bytes; converting would canonicalise NaN patterns.
    packed = packed.contiguous().view(torch.uint8).reshape(-1) if packed.dtype != torch.uint8 else packed.reshape(-1)
    packed = word_aligned(packed)
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
