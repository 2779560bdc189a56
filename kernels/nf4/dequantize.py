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
tiles) are their fast paths when rows of W hold whole quantization blocks. They take their codes
by warp shuffle from the 16 fp32 codes held across each half-warp (lookup_word, lookup_byte), or,
where that spilled, load them from the 16-entry table (64 B, one L1 line per warp's lookup). A
256-entry table of code pairs issued fewer instructions but spread each warp's lookups over ~14
lines, and the machine-code model found its L1 traffic the bound of every kernel that used it
(docs/kernels.md).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from qlora.kernels.nf4.checks import check_compute_dtype, check_triton_size, check_weight
from qlora.kernels.nf4.packed import Packed4bit
from qlora.kernels.backend import interpreter_enabled
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


# Nibble k of a word's 8 elements in element order: byte b holds element 2b in its high nibble.
WORD_SHIFTS = (4, 0, 12, 8, 20, 16, 28, 24)
# GPU: one warp shuffle per code. Lanes l and l + 16 hold code[l & 15], and each lane reads the lane
# its nibble names within its own 16-lane half: shfl.sync.idx with c = 0x101f is CUDA's
# __shfl_sync(mask, v, src, width=16), which uses only the low 4 bits of src, so a nibble needs a
# shift and no mask. Everything here is uniform across the warp (no divergence inside a tile's
# decode), as shfl.sync with a full mask requires.
_LOAD_TABLE = ["mov.u32 lane, %laneid;", "and.b32 lane, lane, 15;", "mul.wide.u32 address, lane, 4;"]


def shuffle_lookup_ptx(shifts, table_loaded: bool) -> str:
    """PTX for one asm block: the codes of the nibbles at `shifts` of $n (n = len(shifts)) into $0..$n-1,
    from the lane's code_table value in $n+1 (`table_loaded`), or loaded here from the table at
    address $n+1 (one load per block, which ptxas merges across a thread's blocks)."""
    n = len(shifts)
    lines = ["{", ".reg .b32 nibble;"]
    table = f"${n + 1}"
    if not table_loaded:
        table = "table"
        lines += [".reg .b32 lane;", ".reg .b64 address;", ".reg .f32 table;", *_LOAD_TABLE,
                  f"add.s64 address, address, ${n + 1};", "ld.global.nc.f32 table, [address];"]
    for k, shift in enumerate(shifts):
        if shift == 0:
            lines.append(f"shfl.sync.idx.b32 ${k}, {table}, ${n}, 0x101f, -1;")
        else:
            lines += [f"shr.u32 nibble, ${n}, {shift};", f"shfl.sync.idx.b32 ${k}, {table}, nibble, 0x101f, -1;"]
    return "\n".join(lines + ["}"])


_SHUFFLE_WORD = tl.constexpr(shuffle_lookup_ptx(WORD_SHIFTS, False))
_SHUFFLE_WORD_FROM_TABLE = tl.constexpr(shuffle_lookup_ptx(WORD_SHIFTS, True))
_SHUFFLE_BYTE = tl.constexpr(shuffle_lookup_ptx((4, 0), False))  # a byte's high nibble first
_CODE_TABLE = tl.constexpr("\n".join(["{", ".reg .b32 lane;", ".reg .b64 address;", *_LOAD_TABLE,
                                       "add.s64 address, address, $1;", "ld.global.nc.f32 $0, [address];", "}"]))
# The interpreter cannot run PTX: there the same codes come from a load per nibble.
SHUFFLE_LOOKUPS = tl.constexpr(not interpreter_enabled())


@triton.jit
def code_table(code_ptr, like):
    """The shuffles' source in `like`'s layout: code[lane & 15] in every element of a lane; zeros,
    unused, where the lookups are loads (the interpreter). The loops that fetch a trip ahead take it
    once, before the loop (lookup_word's `table`). Loaded in each trip's shuffle blocks, it cost a
    lane id, a mask, an address and a load every trip: sm_80's split decode loop at M = 1 went from
    205 to 200 instructions a trip without them, and sm_90's from 214 to 206, its tile from 80
    registers to 64. Not in the other decodes, where it is one register an element of `like`
    (ptxas did not merge them): the GEMV's 4-16 row tiles on sm_90 and the backward's byte tiles at
    blocksize 256 on sm_86/89 spilled 8-16 B, and the H100's 32-row tiles took 8% longer."""
    if SHUFFLE_LOOKUPS:
        base = tl.zeros_like(like).to(tl.int64) + code_ptr.to(tl.int64, bitcast=True)
        table = tl.inline_asm_elementwise(_CODE_TABLE, "=r,l", [base], dtype=tl.float32, is_pure=True, pack=1)
    else:
        table = tl.zeros_like(like).to(tl.float32)
    return table


@triton.jit
def lookup_word(code_ptr, word, table=None):
    """The 8 fp32 codes of int32 `word` of packed nibbles, in element order (WORD_SHIFTS); `table`:
    code_table in word's layout, or None to load it with the shuffles.

    On a GPU one SHFL per code: a load from the 16-entry table cost a shift, a mask-and-OR into the
    table's address, a copy of the address's high word and the load itself, each lookup an L1
    wavefront besides (sm_90 fused decode loop: 340 instructions a trip against 264)."""
    if SHUFFLE_LOOKUPS:
        if table is None:
            base = tl.zeros_like(word).to(tl.int64) + code_ptr.to(tl.int64, bitcast=True)
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _SHUFFLE_WORD, "=r,=r,=r,=r,=r,=r,=r,=r,r,l", [word, base], dtype=(tl.float32,) * 8, is_pure=True,
                pack=1)
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _SHUFFLE_WORD_FROM_TABLE, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [word, table], dtype=(tl.float32,) * 8,
                is_pure=True, pack=1)
    else:
        v0 = tl.load(code_ptr + ((word >> 4) & 15))
        v1 = tl.load(code_ptr + (word & 15))
        v2 = tl.load(code_ptr + ((word >> 12) & 15))
        v3 = tl.load(code_ptr + ((word >> 8) & 15))
        v4 = tl.load(code_ptr + ((word >> 20) & 15))
        v5 = tl.load(code_ptr + ((word >> 16) & 15))
        v6 = tl.load(code_ptr + ((word >> 28) & 15))
        v7 = tl.load(code_ptr + ((word >> 24) & 15))
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def lookup_byte(code_ptr, byte, SHUFFLE: tl.constexpr):
    """The codes of int32 `byte`'s high and low nibbles: shuffled as lookup_word's where SHUFFLE (and
    not interpreted), else two table loads."""
    if SHUFFLE_LOOKUPS and SHUFFLE:
        base = tl.zeros_like(byte).to(tl.int64) + code_ptr.to(tl.int64, bitcast=True)
        high, low = tl.inline_asm_elementwise(_SHUFFLE_BYTE, "=r,=r,r,l", [byte, base], dtype=(tl.float32,) * 2,
                                              is_pure=True, pack=1)
    else:
        high = tl.load(code_ptr + (byte >> 4))
        low = tl.load(code_ptr + (byte & 15))
    return high, low


# The decoded tile as the MMA's A operand, straight from registers. A thread decodes whole words: 8
# neighbouring elements of one row, 2 words a row (1 for 32-wide tiles), 2 of the tile's rows. mma.sync
# (and a warpgroup MMA's register operand) wants, per 16-wide slice of K, pairs or fours of K from 2 rows
# 8 apart. A product is the same over any order of K and of its rows, so the tile is relabelled (no data
# moves) until a thread's decoded values sit where the MMA reads them: K within a word and the words a
# thread holds go to the pair/four and the slices, the words along lanes to the lanes; rows 32 apart go
# to rows 8 apart. The input takes the same K order (mma_k_order on its tile, which keeps its loads
# contiguous), and the product's rows go back in order (mma_row_order_inverse) after the loop. Without
# it the tile went through shared memory (STS, LDSM) every trip: sm_80's 16-row loop was 312 against
# 234 issue cycles a trip, 10.5 against 6.5 KB of shared-memory traffic.
@triton.jit
def mma_k_order(values, COLS: tl.constexpr, K_WIDTH: tl.constexpr):
    """[rows, COLS] with K (its columns, COLS % 32 == 0, as decoded by 4 lanes) in the order of an MMA
    operand of K_WIDTH neighbours a thread (Triton's kWidth: 4 for mma.sync on sm_80-89, 2 for the
    warpgroup MMA on sm_90)."""
    WORDS_A_THREAD: tl.constexpr = COLS // 32
    # [rows, lane's word, thread's word, element bits 4, 2, 1]
    six = tl.reshape(values, (values.shape[0], 4, WORDS_A_THREAD, 2, 2, 2))
    if K_WIDTH == 4:  # K: element bits 1, 2 | lanes | element bit 4 | thread's words
        six = tl.permute(six, (0, 2, 3, 1, 4, 5))
    else:  # K: element bit 1 | lanes | element bits 2, 4 | thread's words
        six = tl.permute(six, (0, 2, 3, 4, 1, 5))
    return tl.reshape(six, (values.shape[0], COLS))


@triton.jit
def fetch_operand_rows(row_ptrs, row_mask, col0, col_end, stride, COPIES: tl.constexpr):
    """[COPIES, rows, 64] of row_ptrs[:, None] + (col0 + arange(64)) * stride, nothing read where
    col0 >= col_end (a whole tile past the end: its values are never used) nor in rows off row_mask
    (garbage there, in MMA output columns nobody reads). Each copy is held as decode_fetched_row_tile
    holds W's words: 4 lanes along the columns, 16 neighbouring ones a thread (two 8-wide loads,
    joined), the rows along the other 8 lanes; a copy a warp. After mma_k_order that is a batched
    mma.sync's B operand in the registers it was loaded in. Every warp loads the same rows because
    Triton gives a load no more elements a thread than it has over its threads (an 8 x 64 tile: 4
    of 128 threads' 16); the copies let a thread load its 16 columns."""
    lane_cols = col0 + tl.arange(0, 4)[None, None, :, None] * 16 + tl.arange(0, 8)[None, None, None, :]
    copies = tl.arange(0, COPIES)[:, None, None, None] * 0
    ptrs = row_ptrs[None, :, :, None] + (lane_cols + copies).to(tl.int64) * stride
    mask = row_mask[None, :, :, None] & (tl.zeros_like(lane_cols) + col0 < col_end)
    halves = tl.join(tl.load(ptrs, mask=mask), tl.load(ptrs + 8 * stride, mask=mask))
    both = tl.permute(halves, (0, 1, 2, 4, 3))  # [copy, row, lane, half, 8]
    return tl.reshape(both, (COPIES, both.shape[1], 64))


@triton.jit
def mma_row_order(values):
    """[64, cols], rows as a 4-warp decode holds them (lanes: +1, +2, +4; warps: +8, +16; registers:
    +32) relabelled as a 4-warp MMA reads its A operand (registers: +8; warps: +16, +32)."""
    bits = tl.reshape(values, (2, 2, 2, 8, values.shape[1]))  # row bits 32, 16, 8 | 1-4
    return tl.reshape(tl.permute(bits, (1, 2, 0, 3, 4)), (64, values.shape[1]))


@triton.jit
def mma_row_columns(rows):
    """The rows' places in row order of a [64, cols] tile held in mma_row_order (row bits 1-4 stay;
    8 -> 32, 16 -> 8, 32 -> 16): mma_row_order(arange(64)) as arithmetic, in any layout."""
    return (rows & 7) | ((rows >> 3 & 1) << 5) | ((rows >> 4 & 1) << 3) | ((rows >> 5 & 1) << 4)


@triton.jit
def mma_row_order_inverse(values):
    """mma_row_order undone: [64, cols] back in row order."""
    bits = tl.reshape(values, (2, 2, 2, 8, values.shape[1]))  # as relabelled: rows 16, 8, 32 | 1-4
    return tl.reshape(tl.permute(bits, (2, 0, 1, 3, 4)), (64, values.shape[1]))


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
                          NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SHUFFLE: tl.constexpr):
    """decode_row_tile's values from bytes rather than words, each byte's two codes by lookup_byte
    (SHUFFLE: by warp shuffle, else table loads): more work per weight, but fewer registers.
    Backward tiles that the word decode does not suit take it: the fused kernel's at blocksize 256,
    with fp32 products or past 16 rows spilled 8-224 B with words (table loads with OR-ed addresses,
    or shuffles), and the GEMV's Llama-3-8B layer at M = 1 was 0.82x bf16 with the word decode
    against 0.95x with this one (the machine-code model, H100, with table loads)."""
    HALF: tl.constexpr = COLS // 2
    byte_cols = col0 // 2 + tl.arange(0, HALF)
    byte_mask = row_mask[:, None] & (byte_cols < IN_FEATURES // 2)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * (IN_FEATURES // 2) + byte_cols[None, :], mask=byte_mask,
                   other=0).to(tl.int32)
    high, low = lookup_byte(code_ptr, byte, SHUFFLE)
    values = tl.interleave(high, low)  # high nibble first
    return scale_row_tile(values, rows, row_mask, col0, IN_FEATURES, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                          offset_ptr, COLS, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)


@triton.jit
def decode_stored_tile(packed_ptr, offs_r, mask_r, offs_n, mask_n, col0, w_stride_r, w_stride_c, IN_FEATURES, absmax_ptr,
                       code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, COLS: tl.constexpr,
                       BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       WHOLE_BLOCKS: tl.constexpr, SHUFFLE: tl.constexpr):
    """fp32 tile [offs_r, offs_n] of a product's B operand the word decode does not take: with whole
    blocks W[r tile, col0 : col0 + COLS] as stored (the backward's tile, decode_row_tile_bytes),
    otherwise element by element at W's strides (any shape, either direction)."""
    if WHOLE_BLOCKS:
        w = decode_row_tile_bytes(packed_ptr, offs_r, mask_r, col0, IN_FEATURES, absmax_ptr, code_ptr, nested_absmax_ptr,
                                  nested_code_ptr, offset_ptr, COLS, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, SHUFFLE)
    else:
        index = offs_r[:, None] * w_stride_r + offs_n[None, :] * w_stride_c
        w = decode_4bit(packed_ptr, index, mask_r[:, None] & mask_n[None, :], absmax_ptr, code_ptr, nested_absmax_ptr,
                        nested_code_ptr, offset_ptr, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    return w


@triton.jit
def decode_row_tile(packed_ptr, rows, row_mask, col0, IN_FEATURES, absmax_ptr, code_ptr, nested_absmax_ptr,
                    nested_code_ptr, offset_ptr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 W[rows, col0 : col0 + COLS] from whole 32-bit words and whole quantization blocks.

    Needs IN_FEATURES % BLOCKSIZE == 0, col0 % BLOCKSIZE == 0, COLS % BLOCKSIZE == 0 (so every row
    starts on a word and on a block: a row's bytes are one contiguous run of words, each read once
    for its eight nibbles, and the tile's scales are COLS / BLOCKSIZE per row), a 4-byte-aligned
    packed tensor. Each word's 8 codes come from lookup_word (a shift and a warp shuffle each on a
    GPU): extracting bytes first cost a PRMT, a redundant mask and two shifts per byte in the sm_90
    SASS. Elements past the edges decode to finite values (scale 0, or the offset): callers mask them
    out of products and stores.
    """
    word, absmax, nested_scale = fetch_row_tile(packed_ptr, rows, row_mask, col0, IN_FEATURES, IN_FEATURES, absmax_ptr,
                                                nested_absmax_ptr, COLS, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    return decode_fetched_row_tile(word, absmax, nested_scale, code_ptr, nested_code_ptr, offset_ptr, COLS, BLOCKSIZE,
                                   DOUBLE_QUANT)


@triton.jit
def fetch_row_tile(packed_ptr, rows, row_mask, col0, col_end, IN_FEATURES, absmax_ptr, nested_absmax_ptr,
                   COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                   DOUBLE_QUANT: tl.constexpr):
    """What decode_row_tile reads from DRAM for W[rows, col0 : col0 + COLS]: the tile's 32-bit words
    [rows, COLS / 8] and per block its absmax (the uint8 code, with double quant) and nested scale
    [rows, COLS / BLOCKSIZE]; nothing at or past column `col_end` (a multiple of BLOCKSIZE, at most
    IN_FEATURES). Loops fetch the next tile while they decode this one (decode_fetched_row_tile), so
    no load is used in the trip that issues it."""
    WORDS: tl.constexpr = COLS // 8
    BLOCKS: tl.constexpr = COLS // BLOCKSIZE
    words_per_row = IN_FEATURES // 8
    word_cols = col0 // 8 + tl.arange(0, WORDS)
    word = tl.load(packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + rows[:, None] * words_per_row
                   + word_cols[None, :], mask=row_mask[:, None] & (word_cols < col_end // 8)[None, :], other=0)
    blocks_per_row = IN_FEATURES // BLOCKSIZE
    block_cols = col0 // BLOCKSIZE + tl.arange(0, BLOCKS)
    block = rows[:, None] * blocks_per_row + block_cols[None, :]
    block_mask = row_mask[:, None] & (block_cols < col_end // BLOCKSIZE)[None, :]
    if DOUBLE_QUANT:
        absmax = tl.load(absmax_ptr + block, mask=block_mask, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=block_mask, other=0.0)
    else:
        absmax = tl.load(absmax_ptr + block, mask=block_mask, other=0.0).to(tl.float32)
        nested_scale = absmax
    return word, absmax, nested_scale


@triton.jit
def decode_fetched_row_tile(word, absmax, nested_scale, code_ptr, nested_code_ptr, offset_ptr, COLS: tl.constexpr,
                            BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, table=None):
    """fp32 values of a tile fetched by fetch_row_tile: codes (lookup_word, `table` its code_table)
    times scales. Masked-off blocks decode to the offset (absmax code 0, nested scale 0) or 0, as
    load_scale's do."""
    BLOCKS: tl.constexpr = COLS // BLOCKSIZE
    v0, v1, v2, v3, v4, v5, v6, v7 = lookup_word(code_ptr, word, table)
    # Each join's new dimension is a thread's lowest register bit, so joining the +4 pairs first and
    # the even/odd halves last gives [rows, WORDS, 2, 2, 2] in element order 8 w + 4 i + 2 j + k with
    # a thread's registers in that order too, which mma_k_order relabels for the MMA (no permute).
    values = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    values = tl.reshape(values, (values.shape[0], COLS))
    if DOUBLE_QUANT:
        # As load_scale: a multiply then an add, two roundings (the launches disable contraction).
        scale = tl.load(nested_code_ptr + absmax) * nested_scale + tl.load(offset_ptr)
    else:
        scale = absmax
    values = tl.reshape(values, (values.shape[0], BLOCKS, BLOCKSIZE)) * scale[:, :, None]
    return tl.reshape(values, (values.shape[0], COLS))


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
