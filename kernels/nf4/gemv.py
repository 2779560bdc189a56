"""Triton: decode GEMV (M = 1 and small batches), split-K over the weight, fp32 partial sums.

At M <= 16 the product is bound by reading W: 4096x4096 NF4+DQ is 8.65 MB, ~3 us at 3 TB/s, and
every row of the batch must reuse the same bytes. So one program owns a [BLOCK_N, R / SPLIT_K]
slab of W, decodes each tile once and multiplies it against all M rows (a broadcast product and a
sum over R; tl.dot would pad M to 16). With only cols / BLOCK_N = 64 column tiles for N = 4096,
the K dimension is split to give the 132 SMs of an H100 enough programs.

At this size the decode, not DRAM, is what can limit it: 4096x4096 is 16.8M elements, and at one
load instruction per element an H100 spends about as long issuing loads (~2.3 us) as reading the
bytes. When rows of W hold whole quantization blocks (in_features % blocksize == 0, every Llama-
family shape) tiles are decoded by decode_row_tile: contiguous bytes, both nibbles of a byte from
one load, one scale per block. Compiled for sm_90 that was 42 global loads per 32 elements a
thread decodes (1.3 per element) where the per-element decode_4bit took 165 (5.2); see
benchmarks/kernels_static.py.

The split partial sums go to an fp32 workspace [SPLIT_K, M, cols]; the last split of each output
tile to arrive (an atomic counter per tile) adds them in split order, adds the bias and casts:
deterministic (the same order whichever split finishes last), fp32 throughout (bf16 atomics do not
exist), and one launch per product, where a separate reduction kernel cost a second fixed launch
time (~6 us in the calibrated model: a third of a bf16 4096x4096 decode). For M=1, N=4096 and
SPLIT_K=4 the workspace is 64 KB, <1% of W.

Forward tiles of whole blocks are fetched a trip ahead (fetch_row_tile: 32-bit words of packed
nibbles and the blocks' scales, in registers) and decoded by decode_fetched_row_tile: each nibble's
code one shift and one warp shuffle (lookup_word). A load per code from the 16-entry table cost a
mask-and-OR into its address, a copy of the address's high word and an L1 access besides; a
256-entry table of code pairs (one 8-byte gather per byte) spread its gathers over 16 lines and ~25
sectors of L1 each, which the machine-code model found the binding limit.

`gemv_4bit` takes preallocated `out` and `workspace` and does no host sync (no .item(), the
offset is read through a pointer), so a decode step built on it can be captured in a CUDA graph,
which removes the 10-20 us of Python launch overhead per layer that would otherwise dominate.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from qlora.kernels.nf4.checks import check_matmul_input, check_triton_size, check_weight
from qlora.kernels.nf4.packed import Packed4bit, weight_strides
from qlora.kernels.nf4.dequantize import (code_table, decode_fetched_row_tile, decode_row_tile, decode_stored_tile,
                                          fetch_row_tile, weight_pointers, whole_block_tiles)
from qlora.kernels.launch import launch

GEMV_BLOCK_M = 16  # rows per program
# No software pipelining of the main loop: at 2-3 stages Triton also pipelines the code-table gathers
# through shared memory (an LDGSTS and an LDS per lookup), and the model put Llama-3-8B's M=1 layer
# at 187 us (3 stages) against 181 us at 1 on the H100 (with the code-pair table of the time).
GEMV_STAGES: tl.constexpr = tl.constexpr(1)
# Products a program may keep in registers across the loop: 8192 fp32 over 128 threads = 64 each
# (168 registers on sm_90 at 1 x 128 x 64, no spill). Twice the 4096 of before halves the loop's
# per-trip overhead per weight: the model's Llama-3-8B M=1 layer went from 181 to 159 us on the
# H100, M=4 from 232 to 218 us.
# A per-element decode keeps an index, a byte and a scale chain live per weight besides: at 4096
# products (1 x 64 x 64, blocksize 4096, backward) sm_90 took 255 registers and spilled 24 B; at
# 2048 (1 x 64 x 32) 96 registers and no spill, the same instructions per weight.
GEMV_REGISTER_PRODUCTS = 8192
# The forward's word decode with table loads kept the table's high address word beside each lookup:
# at 8192 products sm_90 took 224 registers (2 programs an SM) and the model's Llama-3-8B M=1 layer
# was 0.90x bf16 on the H100, at 4096 96 registers (5 an SM) and 0.96x, at 2048 0.76x. With shuffled
# lookups and the next tile fetched ahead, 4096 products compile to 96 registers on sm_90.
GEMV_FORWARD_PRODUCTS = 4096
GEMV_REGISTER_PRODUCTS_PER_ELEMENT = 2048


def gemv_register_products(whole_blocks: bool, blocksize: int = 64, transpose_weight: bool = False) -> int:
    if whole_blocks and transpose_weight and blocksize <= 128:
        return GEMV_FORWARD_PRODUCTS
    if blocksize > 128:
        # 8192 products over 256-element rows (1 x 32 x 256 forward, 2 x 256 x 16 backward) spilled
        # 8 B on sm_86/89/90: the longer rows keep more bytes and scales live per thread. 4096 there.
        return min(GEMV_REGISTER_PRODUCTS_PER_ELEMENT * 2, GEMV_REGISTER_PRODUCTS) if whole_blocks else \
            GEMV_REGISTER_PRODUCTS_PER_ELEMENT
    return GEMV_REGISTER_PRODUCTS if whole_blocks else GEMV_REGISTER_PRODUCTS_PER_ELEMENT


def gemv_num_warps(block_m: int, block_n: int, block_r: int, whole_blocks: bool, transpose_weight: bool,
                   blocksize: int = 64) -> int:
    """Warps of a GEMV program. In backward, 8-row tiles that reduce per tile (past the register
    array) and hold 8192 products (8 x 64 x 16) spilled 8 B at 4 warps on sm_80 (64 registers); at 2
    warps they compile to 64-127 registers and no spill on every arch, and issue fewer warp
    instructions per weight (2 x 495 against 4 x 329 on sm_80): the cross-warp part of each tile's
    sum goes away. Elsewhere 2 warps cost more in the model than they save (2 x 256 x 16 at
    blocksize 256, the forward 8 x 16 x 64: 1.3-1.9x), so 4."""
    products = block_m * block_n * block_r
    per_tile = gemv_register_products(whole_blocks, blocksize, transpose_weight) < products <= 8192
    return 2 if per_tile and block_m == 8 and not transpose_weight else 4


# Partial sums the last split has in flight at once (sum_split_partials): SPLIT_SUM_ELEMENTS fp32, 32 a
# thread at 128 threads, in loads of one split's tile each, at most SPLIT_SUM_MAX_LOADS of them by
# default. ptxas had unrolled the loop of one load and one add per split 4 times by itself; written
# out, the loads are independent by construction and the last split waits SPLIT_K / loads L2 round
# trips (the machine-code model charges them so: benchmarks/kernels_static.py). A 16 x 64 decode
# tile: 4 loads; 8 x 64 and smaller (the GEMV's tiles, the one row of M = 1: matmul's SUM_ROWS): 8, so
# a 16-way split sums in 2 round trips, not 4. The host decides (split_sum_loads) and hands the
# kernels the count (SUM_LOADS); the fused kernel's one row takes more on sm_80-89
# (matmul.ROW_SUM_MAX_LOADS).
# Tiles past 16 x 64 keep one load a split: 4 of a 64 x 64 tile held 128 registers (96 before) and
# cost sm_90 a program an SM.
SPLIT_SUM_ELEMENTS = 4 * 16 * 64
SPLIT_SUM_MAX_LOADS = 8
SPLIT_SUM_TILE = 16 * 64


def split_sum_loads(rows: int, cols: int, most: int = SPLIT_SUM_MAX_LOADS) -> int:
    """Partial-sum loads sum_split_partials has in flight for a rows x cols tile, at most `most`: the
    kernels' SUM_LOADS."""
    if rows * cols > SPLIT_SUM_TILE:
        return 1
    return max(1, min(most, SPLIT_SUM_ELEMENTS // (rows * cols)))


def split_sum_bound(trips: int, rows: int, cols: int) -> int:
    """The most splits of `trips` trips of R whose last-split sum takes no more L2 round trips
    (SPLIT_K / split_sum_loads) than each split has trips of its own (trips / SPLIT_K): past it the
    fix-up outgrows the work it split off. A k_proj at M = 1 (64 trips, 16 column tiles) had been
    split 32 ways on the H100 in 16-row tiles: 2 trips a split and 8 round trips to sum them."""
    return max(1, math.isqrt(split_sum_loads(rows, cols) * trips))


@triton.jit
def sum_split_partials(partial_ptr, offsets, mask, SPLIT_K, split_stride, ROWS: tl.constexpr, COLS: tl.constexpr,
                       LOADS: tl.constexpr):
    """The fp32 partial sums of SPLIT_K splits (split s at partial_ptr + s * split_stride + offsets),
    added in split order: the same sum whichever split arrives last. LOADS splits' loads a trip
    (split_sum_loads; no load waits on the sum, so they issue together); a split past SPLIT_K
    loads +0.0, which leaves the sum's bits as they are (it never holds -0.0: it starts at +0.0).
    .cg reads them from L2, past a stale L1."""
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    if LOADS > 1:
        for first in range(0, SPLIT_K, LOADS):
            base = partial_ptr + first * split_stride + offsets
            # As a tensor the bound masks alike compiled and interpreted (a Python bool there is no mask).
            left = tl.zeros_like(offsets) + (SPLIT_K - first)
            for j in tl.static_range(LOADS):
                acc += tl.load(base + j * split_stride, mask=mask & (left > j), other=0.0, cache_modifier=".cg")
    else:
        for other in range(0, SPLIT_K):
            acc += tl.load(partial_ptr + other * split_stride + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _gemv_4bit_kernel(
    a_ptr, partial_ptr, counter_ptr, out_ptr, bias_ptr,
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    M, COLS, R, R_PER_SPLIT, SPLIT_K, IN_FEATURES,
    stride_am, stride_ar, w_stride_r, w_stride_c, stride_om, stride_oc,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr, TRANSPOSED: tl.constexpr, ACC_IN_REGISTERS: tl.constexpr,
    DIRECT_STORE: tl.constexpr, HAS_BIAS: tl.constexpr, SUM_LOADS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < COLS
    # int64 row offsets: a strided view's M * stride may pass 2**31.
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    # Small tiles (BLOCK_M * BLOCK_N * BLOCK_R <= GEMV_REGISTER_PRODUCTS, 64 fp32 registers a thread) keep
    # the products element-wise in a register array and sum across lanes once, after the loop:
    # summing inside the loop cost a shuffle-tree reduction per tile (the sm_90 SASS of the M=1
    # forward was 812 instructions per 4096-weight tile, most of them that reduction). Larger
    # tiles would need 128+ registers for that array and spill, so they reduce per tile.
    if WHOLE_BLOCKS and TRANSPOSED:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_R) if ACC_IN_REGISTERS else (1, 1, 1), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_N) if ACC_IN_REGISTERS else (1, 1, 1), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    r_start = split * R_PER_SPLIT
    r_end = tl.minimum(r_start + R_PER_SPLIT, R)
    # At M = 1 the next trip's words, scales and inputs are loaded a trip ahead, in registers (4 words
    # and 2 scale bytes a thread): loaded and used in the same trip, every trip waited a DRAM latency,
    # 11.4 of the 41.0 us the model put on gate_proj at M = 1 on the H100. Software pipelining
    # (GEMV_STAGES) does the same through shared memory and cost more (43.1 us). With more rows sm_86/89
    # compiled the 4 x 16 x 64 tile to 64 registers and 8 B of spill, and the fused kernel is faster
    # there anyway.
    AHEAD: tl.constexpr = WHOLE_BLOCKS and TRANSPOSED and BLOCK_M == 1
    if AHEAD:
        word, absmax, nested_scale = fetch_row_tile(packed_ptr, offs_n, mask_n, r_start, r_end, IN_FEATURES,
                                                    absmax_ptr, nested_absmax_ptr, BLOCK_R, BLOCKSIZE,
                                                    NESTED_BLOCKSIZE, DOUBLE_QUANT)
        table = code_table(code_ptr, word)
        next_r = r_start + tl.arange(0, BLOCK_R)
        a_next = tl.load(a_rows + next_r[None, :].to(tl.int64) * stride_ar,
                         mask=mask_m[:, None] & (next_r < r_end)[None, :], other=0.0).to(tl.float32)
    for r0 in tl.range(r_start, r_end, BLOCK_R, num_stages=GEMV_STAGES):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        # W is rounded to the input dtype first, as in the other paths; products and sums in fp32,
        # the register array's product-and-add one explicit FMA (the launch disables contraction
        # elsewhere, so W's decode rounds exactly as in the dequantize kernel).
        if WHOLE_BLOCKS and TRANSPOSED:  # forward: W[cols tile, r tile] decoded along its rows
            if AHEAD:
                a = a_next
                # The next tile's loads first, so they are in flight through this whole trip.
                next_word, next_absmax, next_nested_scale = fetch_row_tile(  # nothing past this split's end
                    packed_ptr, offs_n, mask_n, r0 + BLOCK_R, r_end, IN_FEATURES, absmax_ptr, nested_absmax_ptr,
                    BLOCK_R, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
                next_r = offs_r + BLOCK_R
                a_next = tl.load(a_rows + next_r[None, :].to(tl.int64) * stride_ar,
                                 mask=mask_m[:, None] & (next_r < r_end)[None, :], other=0.0).to(tl.float32)
                w = decode_fetched_row_tile(word, absmax, nested_scale, code_ptr, nested_code_ptr, offset_ptr, BLOCK_R,
                                            BLOCKSIZE, DOUBLE_QUANT, table)
                word, absmax, nested_scale = next_word, next_absmax, next_nested_scale
            else:
                a = tl.load(a_rows + offs_r[None, :].to(tl.int64) * stride_ar, mask=mask_m[:, None] & mask_r[None, :],
                            other=0.0).to(tl.float32)
                w = decode_row_tile(packed_ptr, offs_n, mask_n, r0, IN_FEATURES, absmax_ptr, code_ptr, nested_absmax_ptr,
                                    nested_code_ptr, offset_ptr, BLOCK_R, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
            w = w.to(a_ptr.dtype.element_ty).to(tl.float32)
            if ACC_IN_REGISTERS:
                acc3 = tl.fma(tl.broadcast_to(a[:, None, :], acc3.shape), tl.broadcast_to(w[None, :, :], acc3.shape),
                              acc3)
            else:
                acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
        else:
            a = tl.load(a_rows + offs_r[None, :].to(tl.int64) * stride_ar, mask=mask_m[:, None] & mask_r[None, :],
                        other=0.0).to(tl.float32)
            # backward: W[r tile, cols tile] as stored, by bytes; any shape element by element. Codes by
            # shuffle at M = 1 (H100 gate_proj backward 51.6 -> 46.1 us in the model); the 16-row tile
            # spilled 8 B on sm_90 with them, and the fused kernel is the faster backward past M = 1.
            w = decode_stored_tile(packed_ptr, offs_r, mask_r, offs_n, mask_n, pid_n * BLOCK_N, w_stride_r, w_stride_c,
                                   IN_FEATURES, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                   BLOCK_N, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, WHOLE_BLOCKS, BLOCK_M == 1)
            w = w.to(a_ptr.dtype.element_ty).to(tl.float32)
            if ACC_IN_REGISTERS:
                acc3 = tl.fma(tl.broadcast_to(a[:, :, None], acc3.shape), tl.broadcast_to(w[None, :, :], acc3.shape),
                              acc3)
            else:
                acc += tl.sum(a[:, :, None] * w[None, :, :], axis=1)
    if ACC_IN_REGISTERS:
        if WHOLE_BLOCKS and TRANSPOSED:
            acc = tl.sum(acc3, axis=2)
        else:
            acc = tl.sum(acc3, axis=1)
    mask_out = mask_m[:, None] & mask_n[None, :]
    last = True
    if not DIRECT_STORE:
        # Split K: each split stores its fp32 partial sums; the last split of this output tile to
        # finish adds all of them, in split order (deterministic: the same sum whichever finishes
        # last), where a second kernel launch would cost the fixed per-kernel time (~6 us in the
        # calibrated model, more than a Llama-3-8B k_proj's whole decode). The barrier orders every
        # thread's partial stores before the counter's release; the counter's acquire orders the
        # loads below after the other splits' releases.
        partial_offsets = offs_m[:, None] * COLS + offs_n[None, :]
        tl.store(partial_ptr + split.to(tl.int64) * M * COLS + partial_offsets, acc, mask=mask_out)
        tl.debug_barrier()
        tile = tl.program_id(2) * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        last = arrived == SPLIT_K - 1
        if last:
            acc = sum_split_partials(partial_ptr, partial_offsets, mask_out, SPLIT_K, M * COLS,
                                     BLOCK_M, BLOCK_N, SUM_LOADS)
            tl.atomic_xchg(counter_ptr + tile, 0)  # zero again for the next launch on this stream
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_oc,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_out)


def gemv_block_sizes(m: int, shape: Sequence[int], blocksize: int, transpose_weight: bool) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_R, whole-block row tiles) for an m-row product with this weight."""
    whole_blocks = whole_block_tiles(shape, blocksize)
    # Rows past 16 go to further programs (grid axis 2), each decoding the same W tiles again (from
    # L2): a 64-row tile would make the broadcast product 4x larger and spill.
    block_m = min(GEMV_BLOCK_M, triton.next_power_of_2(max(m, 1)))  # m = 0: an empty batch
    # The broadcast product holds BLOCK_M * BLOCK_N * BLOCK_R fp32 values: aim at the register target (over
    # a 4-warp program: 64 registers/thread), shrinking the dimension that is free to shrink.
    # Row tiles of whole blocks fix the tile along W's rows to >= blocksize: BLOCK_R in forward,
    # BLOCK_N in backward.
    target = gemv_register_products(whole_blocks, blocksize, transpose_weight)
    if whole_blocks and transpose_weight:
        block_r = max(64, blocksize)
        block_n = max(16, target // (block_m * block_r))
    else:
        block_n = max(64, blocksize) if whole_blocks else 64
        block_r = max(16, target // (block_m * block_n))
    # The product tile must stay within 16384 fp32 values (128 a thread): at blocksize 256, 16 rows
    # x 16 x 256 took 255 registers and spilled 160-376 B on sm_80/86/90. Fewer rows per program
    # then, the rest on further programs (grid axis 2).
    while block_m > 1 and block_m * block_n * block_r > 16384:
        block_m //= 2
    return block_m, block_n, block_r, whole_blocks


def _multiprocessors(device: torch.device) -> int:
    # Cached by torch; a property query, not a sync. CPU (interpreter): pretend 4 so splits get tested.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


_SPLIT_COUNTERS: dict = {}


def split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """int32 zeros, one per output tile, for the split-K arrival count; every launch leaves them zero
    again. One buffer per device and stream: GEMVs on one stream run one after another, while two
    streams could interleave their counts. Allocated (and zeroed) on the first call only, so a CUDA
    graph captured afterwards launches nothing extra."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    counters = _SPLIT_COUNTERS.get(key)
    if counters is None or counters.numel() < tiles:
        counters = _SPLIT_COUNTERS[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return counters


def gemv_split(m: int, cols: int, r: int, block_m: int, block_n: int, block_r: int,
               device: torch.device) -> tuple[int, int]:
    """(SPLIT_K, R per split): about two programs per SM, never a split smaller than one tile, nor
    more splits than split_sum_bound.
    `device` may be anything with an `sms` attribute (the machine-code model's GPUs)."""
    tiles_n = triton.cdiv(cols, block_n)
    sms = getattr(device, "sms", None) or _multiprocessors(device)
    trips = triton.cdiv(r, block_r)
    split_k = max(1, min(triton.cdiv(2 * sms, tiles_n), trips, split_sum_bound(trips, block_m, block_n)))
    r_per_split = triton.cdiv(triton.cdiv(r, split_k), block_r) * block_r
    return triton.cdiv(r, r_per_split), r_per_split


def gemv_workspace_shape(m: int, shape: Sequence[int], blocksize: int, transpose_weight: bool,
                         device: torch.device) -> tuple[int, int, int]:
    r, cols, _, _ = weight_strides(shape, transpose_weight)
    block_m, block_n, block_r, _ = gemv_block_sizes(m, shape, blocksize, transpose_weight)
    split_k, _ = gemv_split(m, cols, r, block_m, block_n, block_r, device)
    return split_k, m, cols


def gemv_4bit(
    a: torch.Tensor,
    weight: Packed4bit,
    transpose_weight: bool = True,
    bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """a [M, R] @ (W^T if transpose_weight else W) (+ bias) for small M; graph-safe with `out`/`workspace`.

    `workspace` is fp32 of gemv_workspace_shape(M, shape, blocksize, transpose_weight, device); its contents
    need no initialisation (every element is written before it is read).
    """
    check_weight(weight)
    check_matmul_input(a, weight, transpose_weight, bias)
    shape, blocksize = weight.shape, weight.blocksize
    check_triton_size(shape)
    m = a.shape[0]
    if m > 64:
        raise ValueError(f"gemv_4bit is for decode batches of at most 64 rows, got {m}; use matmul_4bit_fused")
    r, cols, w_stride_r, w_stride_c = weight_strides(shape, transpose_weight)
    block_m, block_n, block_r, whole_blocks = gemv_block_sizes(m, shape, blocksize, transpose_weight)
    split_k, r_per_split = gemv_split(m, cols, r, block_m, block_n, block_r, a.device)
    if out is None:
        out = torch.empty((m, cols), dtype=a.dtype, device=a.device)
    elif tuple(out.shape) != (m, cols) or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"out must be a [{m}, {cols}] {a.dtype} tensor on {a.device}, got {list(out.shape)} {out.dtype} on {out.device}")
    if m == 0:
        return out  # an empty batch: nothing to launch (block sizes below divide by next_power_of_2(m))
    if workspace is None:
        workspace = torch.empty((split_k, m, cols), dtype=torch.float32, device=a.device)
    elif (tuple(workspace.shape) != (split_k, m, cols) or workspace.dtype != torch.float32
          or not workspace.is_contiguous() or workspace.device != a.device):
        raise ValueError(f"workspace must be a contiguous fp32 {[split_k, m, cols]} tensor on {a.device} "
                         f"(gemv_workspace_shape), got {list(workspace.shape)} {workspace.dtype} on {workspace.device}")
    packed, absmax, nested_absmax, nested_code, offset, double_quant = weight_pointers(weight)
    launch(
        _gemv_4bit_kernel, (triton.cdiv(cols, block_n), split_k, triton.cdiv(m, block_m)),
        a, workspace, split_counters(a.device, triton.cdiv(cols, block_n) * triton.cdiv(m, block_m)), out,
        bias if bias is not None else out, packed, absmax, weight.code, nested_absmax, nested_code, offset,
        m, cols, r, r_per_split, split_k, shape[1], a.stride(0), a.stride(1), w_stride_r, w_stride_c,
        out.stride(0), out.stride(1),
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=weight.nested_blocksize, DOUBLE_QUANT=double_quant,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, WHOLE_BLOCKS=whole_blocks, TRANSPOSED=transpose_weight,
        DIRECT_STORE=split_k == 1, HAS_BIAS=bias is not None, SUM_LOADS=split_sum_loads(block_m, block_n),
        ACC_IN_REGISTERS=block_m * block_n * block_r <= gemv_register_products(whole_blocks, blocksize, transpose_weight),
        num_warps=gemv_num_warps(block_m, block_n, block_r, whole_blocks, transpose_weight, blocksize),
        # No contraction: W decodes to the same bits as in the dequantize kernel; the products are
        # explicit tl.fma, so the inner loop keeps one FFMA per weight and row.
        enable_fp_fusion=False,
    )
    return out
