"""Triton: the fused 4-bit matmul, W tiles dequantized inside the K loop, fp32 accumulation in tl.dot.

One kernel serves both products of the frozen linear, C [M, cols] = A [M, R] @ B [R, cols]:
- forward  Y  = X  @ W^T: R = in,  cols = out, B[r, c] = W[c, r] at element c * in + r;
- backward dX = dY @ W:   R = out, cols = in,  B[r, c] = W[r, c] at element r * in + c.
Only the two element strides of B differ, so the kernel takes them as arguments. The weight never
exists dense in memory: the kernel reads ~0.53 byte/param (packed + scales) where dequantize-then-
cuBLAS writes and re-reads 2 bytes/param of bf16 on top, which is what wins when M is small and
the product is bound by reading W (M below a few hundred on an H100; see ops.FUSED_MAX_M).

W tiles are decoded by decode_row_tile (whole bytes, one scale per block) when rows of W hold
whole quantization blocks, else element by element. Compiled for sm_90 at 4096x4096, M=256, the
row-tile decode takes 44 KB of shared memory (3 blocks per SM) where the per-element one took
132 KB (1 per SM; 120 KB on sm_86/89, above their 99 KB limit: it could not launch on an RTX
3090/4090, A10 or L4), and 85 global-load instructions per tile instead of 493. Decode-sized tiles
(16 rows) fetch the next tile's words and scales a trip ahead (PREFETCH) and run W as the MMA's A
operand: in the forward straight from the registers it was decoded in (REGISTER_A, mma_k_order), on
sm_90 elsewhere through shared memory (SWAP_AB); at M = 1 on mma.sync the input too is its B operand
straight from its loads (REGISTER_B); fused_loop_flags says where.

Split-K (fused_split): where the output tiles leave SMs idle (decode-sized M: 64 column tiles for a
4096-wide projection on 132 SMs), R is split and each split stores fp32 partial sums; the last
split of each output tile to arrive adds them in split order, adds the bias and casts, in the same
launch, and zeroes its arrival counter (gemv.split_counters, shared with the GEMV): deterministic
whichever split finishes last, no second launch, and CUDA-graph safe with a preallocated `out` and
`workspace`.

The twin is reference.linear_4bit / linear_4bit_grad_input on reference.dequantize_4bit.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from qlora.kernels.nf4.checks import check_matmul_input, check_triton_size, check_weight
from qlora.kernels.nf4.packed import Packed4bit, weight_strides
from qlora.kernels.nf4.dequantize import (code_table, decode_fetched_row_tile, decode_row_tile, decode_row_tile_bytes,
                                          decode_stored_tile, fetch_operand_rows, fetch_row_tile, mma_k_order,
                                          mma_row_columns, mma_row_order, mma_row_order_inverse, weight_pointers,
                                          whole_block_tiles)
from qlora.kernels.nf4.gemv import (SPLIT_SUM_MAX_LOADS, _multiprocessors, split_sum_bound, split_sum_loads,
                                    sum_split_partials)
from qlora.kernels.launch import launch, target_arch


@triton.jit
def store_tile(out_ptr, bias_ptr, acc, offs_m, mask_m, offs_n, mask_n, stride_om, stride_oc, HAS_BIAS: tl.constexpr):
    """out[offs_m, offs_n] = acc (+ bias), cast to the output's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :].to(tl.int64) * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _matmul_4bit_kernel(
    a_ptr, out_ptr, bias_ptr, partial_ptr, counter_ptr,
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    M, COLS, R, R_PER_SPLIT, SPLIT_K, IN_FEATURES,
    stride_am, stride_ar, stride_om, stride_oc, w_stride_r, w_stride_c,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, TRANSPOSED: tl.constexpr,
    DIRECT_STORE: tl.constexpr, PREFETCH: tl.constexpr, SWAP_AB: tl.constexpr, SHUFFLE_BYTES: tl.constexpr,
    REGISTER_A: tl.constexpr, REGISTER_B: tl.constexpr, ROWS: tl.constexpr, SUM_ROWS: tl.constexpr,
    SUM_LOADS: tl.constexpr,
):
    # Grouped program order: GROUP_M row tiles share each W column tile while it is in L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(COLS, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    # Tiles read as words (decode_row_tile): forward at blocksize 64+, backward at 64-128 with 16-bit inputs.
    FORWARD_WORDS: tl.constexpr = WHOLE_BLOCKS and TRANSPOSED and BLOCKSIZE >= 64
    # Backward words only in 16-row tiles: 64-row ones (no double quant) spilled 16 B on sm_80/89 with
    # the shuffled lookups.
    BACKWARD_WORDS: tl.constexpr = (WHOLE_BLOCKS and not TRANSPOSED and 64 <= BLOCKSIZE and BLOCKSIZE <= 128
                                    and INPUT_PRECISION != "ieee" and BLOCK_M == 16)
    # Without software pipelining (PREFETCH: 1 stage, decode-sized tiles) the next trip's words, scales
    # and inputs are loaded a trip ahead in registers, as in the GEMV: loaded and used in one trip,
    # each trip waited a DRAM latency. Not for fp32 scales (no double quant): the split forward tile
    # spilled 8 B on sm_80 with them.
    AHEAD: tl.constexpr = PREFETCH and DOUBLE_QUANT and (FORWARD_WORDS or BACKWARD_WORDS)
    # W's tile, fetched ahead and decoded as words, is the MMA's A operand where it was decoded
    # (mma_k_order: REGISTER_A is the operand's kWidth); the input's rows are its B. 64 rows:
    # mma_row_order's 4 warps of 16. The host decides (fused_loop_flags, which fused_split's
    # programs an SM follow); the kernel only holds it to a tile that loop can run.
    A_FROM_DECODE: tl.constexpr = REGISTER_A > 0
    # REGISTER_B: the input's rows are mma.sync's B operand as loaded (fetch_operand_rows), each warp
    # multiplying its 16 of the tile's 64 columns as one batch of a batched dot, not through shared
    # memory (a store, two barriers and four loads a trip). The host decides (fused_loop_flags).
    tl.static_assert(not REGISTER_B or (REGISTER_A == 4 and BLOCK_R == 64 and ROWS == 8),
                     "REGISTER_B needs mma.sync's 8-row loop on a 64-deep REGISTER_A tile")
    tl.static_assert(not A_FROM_DECODE or (FORWARD_WORDS and AHEAD and BLOCK_N == 64),
                     "REGISTER_A needs a forward tile of whole blocks, fetched ahead, 64 wide")
    # The rows of the tile that exist: all BLOCK_M, or ROWS (8 where M <= 8: mma's n = 8) in that loop.
    tl.static_assert(ROWS == BLOCK_M or A_FROM_DECODE, "ROWS below BLOCK_M only with REGISTER_A")
    TILE_ROWS: tl.constexpr = ROWS
    tl.static_assert(SUM_ROWS == ROWS or (SUM_ROWS == 1 and A_FROM_DECODE), "SUM_ROWS: all rows, or M = 1's one of acc_t")
    SWAPPED: tl.constexpr = SWAP_AB or A_FROM_DECODE
    offs_m = pid_m * BLOCK_M + tl.arange(0, TILE_ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < COLS
    # int64 row offsets: M * stride passes 2**31 at M = 150K for a 14336-wide input (or any strided
    # view of a larger buffer). W's own indices stay int32: check_triton_size bounds its numel.
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    if DIRECT_STORE:  # one split: the loop as it compiled before split-K (its registers and stages are tuned)
        r_start = 0
        r_stop = R
    else:
        r_start = split * R_PER_SPLIT
        r_stop = r_start + R_PER_SPLIT
    if REGISTER_B:
        acc_w = tl.zeros((4, 16, TILE_ROWS), dtype=tl.float32)
    elif SWAPPED:
        acc_t = tl.zeros((BLOCK_N, TILE_ROWS), dtype=tl.float32)
    else:
        acc = tl.zeros((TILE_ROWS, BLOCK_N), dtype=tl.float32)
    r_last = tl.minimum(r_stop, R)
    if AHEAD:
        if FORWARD_WORDS:
            word, absmax, nested_scale = fetch_row_tile(packed_ptr, offs_n, mask_n, r_start, r_last, IN_FEATURES,
                                                        absmax_ptr, nested_absmax_ptr, BLOCK_R, BLOCKSIZE,
                                                        NESTED_BLOCKSIZE, DOUBLE_QUANT)
        else:
            first_r = r_start + tl.arange(0, BLOCK_R)
            word, absmax, nested_scale = fetch_row_tile(packed_ptr, first_r, first_r < r_last, pid_n * BLOCK_N,
                                                        IN_FEATURES, IN_FEATURES, absmax_ptr, nested_absmax_ptr,
                                                        BLOCK_N, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        # The code table once a program (code_table) in the forward; the backward's 16-row loop
        # issued 294 cycles a trip with it on sm_80, not 284, and keeps loading it in its trips.
        table = code_table(code_ptr, word) if FORWARD_WORDS else None
        if REGISTER_B:
            a_next = fetch_operand_rows(a_rows, mask_m[:, None], r_start, r_last, stride_ar, 4)
        else:
            next_r = r_start + tl.arange(0, BLOCK_R)
            a_next = tl.load(a_rows + next_r[None, :].to(tl.int64) * stride_ar,
                             mask=mask_m[:, None] & (next_r < r_last)[None, :], other=0.0)
    # REGISTER_B's loads leave a tile past R unwritten, not zero (fetch_operand_rows), so its loop
    # ends at R's end: a trip past it would multiply those by W's masked words, decoded to the
    # offset. The others end at the split's end, zeros and all: ending them at R's too moved sm_86's
    # backward split loop's next-trip loads from 0.61 to 0.35 of a trip ahead (RTX 3090 Llama-3-8B
    # layer backward at M = 1: 217.8 -> 234.2 us in the model).
    for r0 in range(r_start, r_last if REGISTER_B else r_stop, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        if AHEAD:
            a = a_next
            next_r = offs_r + BLOCK_R
            next_mask = next_r < r_last  # nothing past this split's end (or R) is read
            if FORWARD_WORDS:
                next_word, next_absmax, next_nested_scale = fetch_row_tile(
                    packed_ptr, offs_n, mask_n, r0 + BLOCK_R, r_last, IN_FEATURES, absmax_ptr, nested_absmax_ptr,
                    BLOCK_R, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
            else:
                next_word, next_absmax, next_nested_scale = fetch_row_tile(
                    packed_ptr, next_r, next_mask, pid_n * BLOCK_N, IN_FEATURES, IN_FEATURES, absmax_ptr,
                    nested_absmax_ptr, BLOCK_N, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
            if REGISTER_B:
                a_next = fetch_operand_rows(a_rows, mask_m[:, None], r0 + BLOCK_R, r_last, stride_ar, 4)
            else:
                a_next = tl.load(a_rows + next_r[None, :].to(tl.int64) * stride_ar,
                                 mask=mask_m[:, None] & next_mask[None, :], other=0.0)
            w = decode_fetched_row_tile(word, absmax, nested_scale, code_ptr, nested_code_ptr, offset_ptr,
                                        BLOCK_R if FORWARD_WORDS else BLOCK_N, BLOCKSIZE, DOUBLE_QUANT, table)
            if REGISTER_B:  # [warp, N, R] and [warp, rows, R]
                w = tl.reshape(mma_row_order(mma_k_order(w, BLOCK_R, REGISTER_A)), (4, 16, BLOCK_R))
                a = mma_k_order(tl.reshape(a, (4 * TILE_ROWS, BLOCK_R)), BLOCK_R, REGISTER_A)
                a = tl.reshape(a, (4, TILE_ROWS, BLOCK_R))
            elif A_FROM_DECODE:  # [N, R]
                w = mma_row_order(mma_k_order(w, BLOCK_R, REGISTER_A))
                a = mma_k_order(a, BLOCK_R, REGISTER_A)
            elif FORWARD_WORDS:
                w = tl.trans(w)
            word, absmax, nested_scale = next_word, next_absmax, next_nested_scale
        else:
            a = tl.load(a_rows + offs_r[None, :].to(tl.int64) * stride_ar, mask=mask_m[:, None] & mask_r[None, :],
                        other=0.0)
            if FORWARD_WORDS:  # B = W^T: decode W[cols tile, r tile], transpose
                w = tl.trans(decode_row_tile(packed_ptr, offs_n, mask_n, r0, IN_FEATURES, absmax_ptr, code_ptr,
                                             nested_absmax_ptr, nested_code_ptr, offset_ptr, BLOCK_R, BLOCKSIZE,
                                             NESTED_BLOCKSIZE, DOUBLE_QUANT))
            elif WHOLE_BLOCKS and TRANSPOSED:  # blocksize 32: the word decode put 112 B on the stack (sm_90, 16 rows)
                w = tl.trans(decode_row_tile_bytes(packed_ptr, offs_n, mask_n, r0, IN_FEATURES, absmax_ptr, code_ptr,
                                                   nested_absmax_ptr, nested_code_ptr, offset_ptr, BLOCK_R, BLOCKSIZE,
                                                   NESTED_BLOCKSIZE, DOUBLE_QUANT, SHUFFLE_BYTES))
            elif BACKWARD_WORDS:  # B = W as stored
                # Words, as the forward (Llama-3-8B backward at M = 4..16 on the H100 0.90x -> 1.01x bf16 by the
                # model); 256-column tiles, fp32 products and blocksize 32 spill with them (decode_row_tile_bytes).
                w = decode_row_tile(packed_ptr, offs_r, mask_r, pid_n * BLOCK_N, IN_FEATURES, absmax_ptr, code_ptr,
                                    nested_absmax_ptr, nested_code_ptr, offset_ptr, BLOCK_N, BLOCKSIZE,
                                    NESTED_BLOCKSIZE, DOUBLE_QUANT)
            else:  # backward tiles by bytes; any shape element by element
                w = decode_stored_tile(packed_ptr, offs_r, mask_r, offs_n, mask_n, pid_n * BLOCK_N, w_stride_r, w_stride_c,
                                       IN_FEATURES, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                       BLOCK_N, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, WHOLE_BLOCKS, SHUFFLE_BYTES)
        # W rounded to the input dtype once, as the dequantize-then-matmul path does; fp32 accumulate.
        if REGISTER_B:
            acc_w = tl.dot(w.to(a.dtype), tl.permute(a, (0, 2, 1)), acc_w, input_precision=INPUT_PRECISION)
        elif A_FROM_DECODE:
            acc_t = tl.dot(w.to(a.dtype), tl.trans(a), acc_t, input_precision=INPUT_PRECISION)
        elif SWAP_AB:
            acc_t = tl.dot(tl.trans(w.to(a.dtype)), tl.trans(a), acc_t, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    if REGISTER_B:
        acc_t = tl.reshape(acc_w, (BLOCK_N, TILE_ROWS))
    # The tile's first SUM_ROWS rows: all of them, or the one row of M = 1 (the rest are the zeros of
    # the masked input rows).
    sum_m = pid_m * BLOCK_M + tl.arange(0, SUM_ROWS)
    sum_mask = sum_m < M
    # M = 1: the row leaves the accumulator where the MMA left it, one column a row of acc_t
    # (mma_row_order), not through shared memory to the tile's row-major layout: 40 instructions
    # fewer on the H100's split decode tile. Not unsplit past 64 x 64: the 64 x 128 tile (blocksize
    # 128) then compiled to 168 registers on sm_86/89, not 124 (3 programs an SM, not 4).
    ROW_STORE: tl.constexpr = SUM_ROWS == 1 and (not DIRECT_STORE or BLOCK_R == 64)
    if ROW_STORE:
        row = tl.sum(tl.where(tl.arange(0, TILE_ROWS)[None, :] == 0, acc_t, 0.0), axis=1)
        row_n = pid_n * BLOCK_N + mma_row_columns(tl.arange(0, BLOCK_N))
        if DIRECT_STORE:
            store_tile(out_ptr, bias_ptr, row[None, :], sum_m, sum_mask, row_n, row_n < COLS, stride_om, stride_oc,
                       HAS_BIAS)
        else:
            tl.store(partial_ptr + split.to(tl.int64) * M * COLS + sum_m.to(tl.int64)[:, None] * COLS + row_n[None, :],
                     row[None, :], mask=sum_mask[:, None] & (row_n < COLS)[None, :])
    else:
        if A_FROM_DECODE:
            acc = tl.trans(mma_row_order_inverse(acc_t))
        elif SWAP_AB:
            acc = tl.trans(acc_t)
        if DIRECT_STORE:
            store_tile(out_ptr, bias_ptr, acc, offs_m, mask_m, offs_n, mask_n, stride_om, stride_oc, HAS_BIAS)
        else:
            tl.store(partial_ptr + split.to(tl.int64) * M * COLS + offs_m.to(tl.int64)[:, None] * COLS + offs_n[None, :],
                     acc, mask=mask_m[:, None] & mask_n[None, :])
    if not DIRECT_STORE:
        # Split K, as in the GEMV (gemv.py): each split stores its fp32 partial sums, and the last
        # split of this output tile to arrive adds all of them in split order (the same sum whichever
        # finishes last), adds the bias and casts, in the same launch; it zeroes the tile's arrival
        # counter for the next launch, so a CUDA graph replays it as it is. The barrier orders every
        # thread's partial stores before the counter's release; the acquire orders the loads of
        # sum_split_partials after the other splits' releases.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # The one row of M = 1 loads 8-16 splits at a time, not the 4 of a 16-row tile (SUM_LOADS).
            total = sum_split_partials(partial_ptr, sum_m.to(tl.int64)[:, None] * COLS + offs_n[None, :],
                                       sum_mask[:, None] & mask_n[None, :], SPLIT_K, M * COLS, SUM_ROWS, BLOCK_N,
                                       SUM_LOADS)
            store_tile(out_ptr, bias_ptr, total, sum_m, sum_mask, offs_n, mask_n, stride_om, stride_oc, HAS_BIAS)
            tl.atomic_xchg(counter_ptr + pid, 0)


def tf32_allowed() -> bool:
    """torch's own switch for TF32 in fp32 matmuls, read through the non-legacy API.

    `torch.backends.cuda.matmul.allow_tf32` is the legacy flag: on torch 2.9+ reading it raises
    once `fp32_precision` has been set (mixing the two APIs is an error), so it is read only where
    the new one does not exist.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        precision = matmul.fp32_precision
        if precision == "none":  # unset for matmuls: the global setting applies
            precision = getattr(torch.backends, "fp32_precision", "none")
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products unless torch itself allows TF32 (torch's default: it does not),
    # so the fused path matches torch.matmul's numerics. fp16/bf16 keep Triton's default ("tf32",
    # meaningless for 16-bit operands): "ieee" there could keep the compiler off the tensor cores.
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def matmul_block_sizes(m: int, dtype: torch.dtype, min_r: int = 0, min_n: int = 0) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_R), BLOCK_R >= min_r and BLOCK_N >= min_n (powers of two, so a
    multiple: decode_row_tile needs its tile along W's rows to hold whole quantization blocks)."""
    # tl.dot needs BLOCK_M >= 16; decode-sized M pads to 16 rows rather than wasting 64.
    # 16-bit: 64x64x64 tiles keep a 4096x4096 product at 4096 programs for M=4096 and compile
    # without spills (tests/test_kernels_compiled.py). fp32 products run on the CUDA cores (FMA,
    # unrolled per thread): 64x64x64 spills there, and so does 32x32x64 once a tile must hold a
    # 64-element quantization block; 16x32x32 (widened to 64 either way) fits in registers.
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_m, block_n, block_r = (16, 32, 32) if dtype == torch.float32 else (block_m, 64, 64)
    block_n, block_r = max(block_n, min_n), max(block_r, min_r)
    # A decoded tile of more than 8192 elements (64 x 256 at blocksize 256) takes 255 registers and
    # spills on every arch: the dimension not fixed by the blocksize shrinks to keep 8192.
    if block_n * block_r > 8192:
        if min_r:
            block_n = max(16, 8192 // block_r)
        else:
            block_r = max(16, 8192 // block_n)
    return block_m, block_n, block_r


# Split-K of the fused kernel (fused_split). At M <= 16 a 4096-wide projection has 64 column tiles of
# 64 for 132 SMs (H100), 16 for k/v_proj, and each program walks all of R with one program per SM,
# waiting a DRAM latency each trip: q_proj forward took 33.6 us in the machine-code model against
# bf16's 18.6. Split towards 4 programs an SM it takes 16.9 us (H100, M = 16); the model put the
# whole Llama-3-8B layer's fused products at 1.05x bf16 for 2 programs an SM, 1.14x for 4, 0.80x
# for 6 (q_proj's busiest SM then gets 7 programs where 6 fit at once: a second round), and the
# A100 at 0.98x, 1.15x, 0.90x. Past 4 tiles an SM the tiles fill the SMs themselves.
# 4 fit at once where 64 x 64 tiles of whole blocks compile to 95-128 registers (128 on sm_80 with
# split-K: 4 x 128 threads x 128 fill an SM's 64K). Wider tiles (blocksize 128+), the per-element
# decode and fp32's CUDA-core tiles take 144-254, so 2-3 fit and the busiest SM may run a second
# round; aimed at 2 instead, the model's blocksize 128/256 cells at M <= 16 got 3-9% faster
# (geometric mean) and blocksize 4096's 4-7% slower, up to 1.7x on some: kept at 4 until the fit
# is read from the compiled kernel.
FUSED_SPLIT_PROGRAMS_PER_SM = 4
# The forward tile decoded into the MMA's A operand (REGISTER_A) compiles to 64-80 registers on
# sm_80/86/89/90, split or not, so 6 fit (tests/test_kernels_compiled.py holds both counts). Split
# towards 6 (fused_programs_per_sm), the model's Llama-3-8B layer at M = 1 went from 199.1 to
# 166.5 us on the A100 (gate_proj 49.7 -> 36.1: 2 splits now fit where the busiest of its 108 SMs
# ran 3 whole tiles) and from 133.1 to 129.7 on the H100. Not on sm_86/89, bound by GDDR: there the
# extra splits' fp32 partial sums took the RTX 3090's layer at M = 16 from 230.5 to 244.2 us.
# One more on sm_80's 8-row loop (72 registers) and on sm_90, whose tile takes 64-72 registers
# since the code table is loaded once a program (dequantize.code_table): counted as 6 there, the
# split cost planned rounds of 6 where 8 ran, and the H100's layer at M = 1 took 135.4 us in the
# model, against 121.4 counted as 7 (125.8 before the table moved).
FUSED_SPLIT_PROGRAMS_PER_SM_REGISTER_A = 6
# sm_90's other 16-row, 16-bit tiles of whole blocks up to 64 x 64 (W the warpgroup MMA's A operand
# through shared memory: the backward, blocksize 32 forward) compile to 58-95 registers, split or
# not: 5 fit. Counted as 4, the split cost's rounds put the H100's Llama-3-70B layer backward at
# M = 1-16 at 358 us in the model, against 334 counted as 5.
FUSED_SPLIT_PROGRAMS_PER_SM_SM90_TILE = 5
# Registers a thread on an SM (every modelled arch) and a decode tile's threads (4 warps).
SM_REGISTERS = 65536
TILE_THREADS = 128
# On the GDDR archs (sm_86/89) a decode-sized product is bound by DRAM, and each split adds fp32
# partial sums to its bytes: what it needs is enough programs to keep the bytes in flight that the
# card's bandwidth asks, and the RTX 3090 (936 GB/s) and 4090 (1008 GB/s) ask about the same. 4
# programs an SM on the 3090's 82 SMs, 3 on the 4090's 128: the model's Llama-3-8B layer on the
# 4090 at M = 1 / 4 / 16 went from 201.9 / 209.2 / 234.0 us (4 an SM) to 200.3 / 204.9 / 220.0.
FUSED_SPLIT_GDDR_PROGRAMS = 320
FUSED_SPLIT_BELOW_TILES_PER_SM = 4
# The one row of M = 1 (SUM_ROWS) sums 16 splits' partial sums a round trip on sm_80-89, so a 16-way
# split waits one L2 round trip, not 2: A100 Llama-3-8B layer at M = 1 160.7 -> 160.4 us in the
# model, RTX 3090 213.1 -> 212.8. Not on sm_90, whose decode loop then compiled to 219 instructions a
# trip, not 214 (H100 125.8 -> 127.3); nor in the GEMV, whose 2- and 4-row loops on sm_86/89 lost
# their fetch-ahead (A10 8192 x 8192 at M = 4: 150 -> 272 us).
ROW_SUM_MAX_LOADS = 16
# On the HBM archs (sm_80, sm_90) a decode-sized product is bound by issue and DRAM latency, not by
# DRAM bandwidth, and what a split changes is the busiest SM's work: tiles x SPLIT_K programs land
# ceil(tiles x SPLIT_K / SMs) to an SM, which runs them in rounds of the programs that fit, each
# round as long as a program's trips. Aiming at programs an SM alone ignored that quantisation: the
# model's H100 put the Llama-3-70B gate_proj at M = 1 (448 tiles) unsplit, 4 programs of 128 trips
# on the busiest SM, 75.5 us, where 5 splits (17 programs, 3 rounds of 26 trips) take 67.5; and
# split q_proj 11 ways (6 programs of 6 trips), 14.58 us, where 8 or 10 ways take 14.15-14.28.
# fused_split_cost counts a trip of a round as max(programs in it, FUSED_SPLIT_LATENCY_PROGRAMS)
# program-trips: fewer programs than that wait on DRAM latency, so a trip costs a latency, as if
# that many were there. A program's prologue and epilogue count FUSED_SPLIT_PROGRAM_TRIPS trips (the
# H100's decode tile: 324 instructions outside the loop and a DRAM latency, against 213 a trip), the
# last split's sum a latency (the counter's atomic) plus SPLIT_SUM_L2_LATENCY of one per round trip
# to L2 (gemv.split_sum_loads). Fitted on the model's A100 and H100 over the decode-sized products of
# Llama-3 8B/70B, Qwen2.5-7B/14B and Llama-3.2-1B (M = 1-16, forward and backward, every split),
# the split it picks is 1.3% slower than the model's best (geometric mean; the old rule 5.0%), 10% at
# worst (old 61%), with fused_programs_per_sm's counts. Not on sm_86/89: there the extra splits' partial sums cost GDDR bytes, and this
# cost took the RTX 3090's Llama-3-8B layer at M = 16 from 232 to 253 us.
FUSED_SPLIT_LATENCY_PROGRAMS = 5
FUSED_SPLIT_PROGRAM_TRIPS = 2
SPLIT_SUM_L2_LATENCY = 0.6  # an L2 hit over a DRAM access, in latency (A100 0.43, AD102 0.41-0.63)
GDDR_ARCHS = (86, 89)
# FLOPs a DRAM byte above which a product is bound by the tensor cores on every modelled card: the
# H100's 989 TFLOP/s over 3.35 TB/s is 295, the most of them.
FUSED_SPLIT_COMPUTE_BOUND = 300
FUSED_SPLIT_MIN_TRIPS = 2
# Tiles past 32 x 8192 products never split: the 64 x 256 x 32 tile (blocksize 256, backward) is at
# 255 registers already, and the split epilogue beside it spilled 144 B on sm_80 and 16 B on sm_90.
FUSED_SPLIT_MAX_PRODUCTS = 32 * 8192


def fused_may_split(config: dict, blocksize: int, double_quant: bool = True) -> bool:
    """Whether this tile configuration compiles with the split-K epilogue without spilling (the
    launchability sweep, benchmarks/kernels_static.py, and tests/test_kernels_compiled.py): not past
    FUSED_SPLIT_MAX_PRODUCTS, and tiles past 16 rows only with double quant at blocksize 64 (32 x 64
    x 64 forward at blocksize 32 spilled 8 B on sm_86/89, twice the scales of blocksize 64 live per
    tile; 64 x 64 x 64 forward without double quant 8 B on sm_80, at 168 registers; with the shuffled
    code lookups 32 x 64 x 128 forward at blocksize 128 8 B on sm_86/89 and 32 x 32 x 256 at 256 on
    sm_90, at 96 registers)."""
    products = config["BLOCK_M"] * config["BLOCK_N"] * config["BLOCK_R"]
    return products <= FUSED_SPLIT_MAX_PRODUCTS and (config["BLOCK_M"] == 16 or (blocksize == 64 and double_quant))

# Shared memory per block each arch lets a kernel take (opt-in maximum, CUDA C Programming Guide,
# table "Technical Specifications per Compute Capability"): 8.0 163 KB, 8.6/8.9 99 KB, 9.0 227 KB.
SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def fused_stages(block_m: int, block_n: int, block_r: int, itemsize: int, whole_blocks: bool, arch: int) -> int:
    """Software-pipeline depth that fits the arch's shared memory, 1..3.

    Each stage buffers the A tile and W's loads. Compiled (sm_86, 64x64x64 bf16): a per-element
    decode gathers the byte, code and scale of every element, 40 KB a stage (3 stages = 120 KB,
    past the 99 KB of an RTX 3090/4090, A10 or L4); a row-tile decode loads bytes and one scale per
    block, ~10 KB a stage. On top, the decoded tile is moved into the tensor-core operand layout
    through shared memory: up to 4 bytes an element (64 KB at 64 x 256).
    """
    a_bytes = block_m * block_r * itemsize
    w_bytes = block_n * block_r * (1 if whole_blocks else 8)
    scratch = block_n * block_r * 4
    limit = SHARED_PER_BLOCK.get(arch, 99 * 1024) - 8 * 1024  # margin for the epilogue and reductions
    fit = (limit - scratch) // (a_bytes + w_bytes)
    # Per-element decode: the gathers are dependent loads a deeper pipeline barely hides, and at 2
    # stages sm_86 spills 8 B (16 x 64 x 64, blocksize 512, backward): 1 stage, 10 KB, no spill.
    # A decoded tile past 4096 elements (blocksize 256: 32 x 256) holds its prefetched bytes and
    # scales in registers across stages: 255 registers and 136 B of spill at 3 stages on sm_80,
    # 138 registers and none at 1.
    # Row tiles of 4096 elements: 3 stages spilled 16 B at 128 registers on sm_80 (backward,
    # no double quant); 2 compile to 164 registers and no spill on every arch.
    # fp32 products (CUDA-core FMAs, 16 x 32 x 64 tiles) spill 8 B at 2 stages on sm_89 and none at 3.
    # 16-row tiles keep 16 B on the stack at 2 stages and none at 3: on sm_90 without double quant,
    # and on sm_86/89 in backward at blocksize 64 (80 registers at 2 stages, 92 and no spill at 3).
    # sm_80 has no such spill at 2, and 3 stages there cost 15% in the model (78 registers, 6 blocks
    # per SM instead of 7).
    # 16-row, 16-bit tiles of whole blocks (decode, M <= 16): 1 stage. Pipelined, Triton also routed
    # the code-pair gathers of the time through shared memory (an LDGSTS.64 and an LDS per packed byte: 32 KB of
    # the 46 KB a 16 x 64 x 64 trip moved through shared memory on sm_80), and the kernel was bound by
    # it; at 1 stage they are L1 gathers into registers. Split-K (fused_split) keeps 4 programs an SM
    # to cover the DRAM latency instead: the model's Llama-3-8B layer at M = 16, H100, backward
    # 0.89x -> 1.25x bf16, forward 1.13x -> 1.14x; A100 1.07x -> 1.25x and 1.11x -> 1.15x; A10
    # 2.26x -> 2.92x. Compiled without spill on sm_80/86/89/90 (80-94 registers).
    if whole_blocks and itemsize == 2 and block_m == 16 and block_n * block_r <= 4096:
        return 1
    deepest = 1 if block_n * block_r > 4096 or not whole_blocks else 3 if itemsize == 4 or (
        block_m == 16 and arch != 80) else 2
    return int(max(1, min(deepest, fit)))


def fused_config(m: int, dtype: torch.dtype, shape: Sequence[int], blocksize: int, transpose_weight: bool,
                 arch: int) -> dict:
    """The fused kernel's tile constexprs and launch options for this product on sm_<arch>."""
    whole_blocks = whole_block_tiles(shape, blocksize)
    # W's rows run along R in forward (B = W^T) and along the output columns in backward (B = W).
    min_r, min_n = ((blocksize, 0) if transpose_weight else (0, blocksize)) if whole_blocks else (0, 0)
    block_m, block_n, block_r = matmul_block_sizes(m, dtype, min_r, min_n)
    stages = fused_stages(block_m, block_n, block_r, dtype.itemsize, whole_blocks, arch)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, WHOLE_BLOCKS=whole_blocks,
                num_warps=4, num_stages=stages)


def fused_loop_flags(config: dict, dtype: torch.dtype, arch: int, m: int, transpose_weight: bool, blocksize: int,
                     double_quant: bool) -> dict:
    """The dense fused kernel's own loop constexprs for a fused_config (the grouped MoE kernel shares
    the tiles, not these)."""
    decode_tile = config["BLOCK_M"] == 16
    prefetch = decode_tile and config["num_stages"] == 1
    # Decode-sized 16-bit products on sm_90: W as the warpgroup MMA's A operand (64 rows of it, the 16
    # rows of the input as B). As B, the decoded tile went to shared memory and back into registers for
    # mma.sync (STS + LDS, 6.5 KB a warp a trip); as A it is stored once and read by LDSM, and the
    # Llama-3-8B gate_proj at M = 1 went from 38.1 to 30.3 us in the model, backward 35.2 to 30.2.
    # On sm_80 (mma.sync either way) it was slower: 85.1 us against 57.2 on the A100.
    # REGISTER_A (the operand's kWidth in Triton's mma layouts: 4 for mma.sync, 2 for the warpgroup
    # MMA) makes the forward's tile, fetched ahead and decoded as words, the A operand in the
    # registers it was decoded in (mma_k_order), on every arch: gate_proj at M = 1 went from 72.1 to
    # 51.6 us on the A100 (shared-memory traffic 10.5 -> 6.5 KB a warp a trip) and from 30.3 to 27.6
    # on the H100 (264 -> 202 instructions a trip: no store and LDSM of the tile). At M <= 8 that loop
    # multiplies 8 input rows (ROWS: mma.sync's n = 8) rather than 16: half the input's shared-memory
    # traffic and MMAs, A100 gate_proj 51.6 -> 49.7 us. Not on sm_90: there ptxas issued the next
    # tile's loads late in the trip (0.16 trips ahead against 0.68) and the H100's took 33.5 us.
    # Byte tiles (backward past the word decode's reach, blocksize 32 forward) take their codes by
    # shuffle where that compiles without spills: 16-row tiles anywhere, and every tile on sm_90. The
    # H100's gate_proj backward at M = 64 went from 102.4 to 48.6 us in the model; 64-row tiles spilled
    # 16 B on sm_80/89 (128 registers).
    # That tile is the kernel's forward word decode fetched ahead (FORWARD_WORDS and AHEAD: whole
    # blocks of 64+, double quant), 64 columns wide (mma_row_order's 4 warps of 16 rows).
    decode_mma = decode_tile and dtype.itemsize == 2  # decode-sized, on the 16-bit tensor-core path
    register_a = (decode_mma and prefetch and transpose_weight and config["WHOLE_BLOCKS"] and blocksize >= 64
                  and double_quant and config["BLOCK_N"] == 64)
    rows = 8 if register_a and m <= 8 and arch < 90 else config["BLOCK_M"]
    sum_rows = 1 if m == 1 and register_a else rows
    # M = 1 on mma.sync (sm_80-89): the input rows as B straight from their loads (REGISTER_B), W's
    # 64-deep tiles only. sm_80's loop lost its store, two barriers and four loads of shared memory a
    # trip (4.1 against 5.4 KB a warp) for two 16-byte loads; A100 Llama-3-8B layer at M = 1
    # 159.5 -> 156.0 us in the model, the RTX 3090's 213.1 -> 212.4. Not at M = 2-16: there the 8-row
    # loop compiled, capped at 72 registers or not, with its next words 0.26-0.37 of a trip ahead
    # (A100 layer at M = 4 159.7 -> 183.1), and 16 rows' B took 16 registers and 45 moves a trip.
    register_b = register_a and arch < 90 and sum_rows == 1 and config["BLOCK_R"] == 64
    return dict(PREFETCH=prefetch,
                SWAP_AB=decode_mma and arch >= 90,
                REGISTER_A=(2 if arch >= 90 else 4) if register_a else 0,
                REGISTER_B=register_b,
                ROWS=rows,
                # The last split sums the one row of M = 1 alone, 8-16 splits a round trip where 16
                # rows take 4 (gemv.split_sum_loads). Only for this tile: the backward's 16-row tile at
                # M = 1 then compiled with its next trip's loads issued 0.22 trips ahead on sm_90, not 0.51.
                SUM_ROWS=sum_rows,
                SUM_LOADS=split_sum_loads(sum_rows, config["BLOCK_N"],
                                          ROW_SUM_MAX_LOADS if sum_rows == 1 and arch < 90 else SPLIT_SUM_MAX_LOADS),
                SHUFFLE_BYTES=decode_tile or arch >= 90)


def fused_programs_per_sm(config: dict, flags: dict, arch: int, sms: int = 0) -> int:
    """Programs of a decode-sized split launch an SM runs at once: on the HBM archs the rounds
    fused_split_cost counts, on the GDDR archs what fused_split aims at and never puts past on the
    busiest SM. The tile decoded into the MMA's A operand (fused_loop_flags' REGISTER_A), 64 x 64,
    keeps W out of shared memory: 64-80 registers, 6 fit (7 of sm_80's 8-row loop at M <= 8, 72
    registers, and of sm_90's, 64-72 with the code table loaded once). sm_90's other 16-row tiles
    up to 64 x 64: FUSED_SPLIT_PROGRAMS_PER_SM_SM90_TILE. On sm_86/89 the extra splits' fp32
    partial sums cost more GDDR bytes than the busiest SM's extra trips, and given the SM count
    their decode tiles aim at FUSED_SPLIT_GDDR_PROGRAMS programs in all. The other tiles:
    FUSED_SPLIT_PROGRAMS_PER_SM.
    `config` and `flags` may be one dict (a launch's constexprs). tests/test_kernels_compiled.py
    holds the launchability sweep to these counts."""
    register_a = flags["REGISTER_A"] > 0 and config["BLOCK_R"] == 64  # wider R tiles take more registers
    if register_a and arch not in GDDR_ARCHS:
        return FUSED_SPLIT_PROGRAMS_PER_SM_REGISTER_A + (arch == 90 or (arch == 80 and flags["ROWS"] == 8))
    if (arch == 90 and flags["SWAP_AB"] and config["BLOCK_M"] == 16 and config["WHOLE_BLOCKS"]
            and config["BLOCK_N"] * config["BLOCK_R"] <= 64 * 64):
        return FUSED_SPLIT_PROGRAMS_PER_SM_SM90_TILE
    if arch in GDDR_ARCHS and config["BLOCK_M"] == 16 and sms:
        return min(FUSED_SPLIT_PROGRAMS_PER_SM, max(2, triton.cdiv(FUSED_SPLIT_GDDR_PROGRAMS, sms)))
    return FUSED_SPLIT_PROGRAMS_PER_SM


def fused_max_registers(config: dict, flags: dict, arch: int, sms: int = 0) -> Optional[int]:
    """The registers a thread the launch caps the tile at (ptxas' maxnreg), or None (ptxas decides):
    what fused_programs_per_sm's programs leave a thread, for the mma.sync tiles that ptxas,
    uncapped, compiled past that or with their next trip's loads late.
    - REGISTER_B (M = 1, sm_80-89) holds its next input tile in 8 registers a thread, not 2, and
      uncapped ptxas loaded the next trip's words into the registers being decoded, so late in the
      trip: on sm_80 0.06-0.36 of a trip ahead, not 0.65-0.68 as capped at 72 (7 programs). On the
      RTX 3090 (4 programs an SM, 128 registers) 0.57 -> 0.68 and 246 -> 222 issue cycles a trip.
    - sm_80's other 64-deep REGISTER_A tiles: with the code table loaded once (dequantize.code_table) the
      16-row loop took 96 registers, 5 programs where the split cost counts 6 (A100 Llama-3-70B
      layer at M = 16: 491.2 -> 553.8 us in the model); capped at 80, 6 fit and it issues 221
      cycles a trip, not 232 (485.0 us). The 8-row loop keeps its 72 so."""
    if not (flags["REGISTER_B"] or (arch == 80 and flags["REGISTER_A"] and config["BLOCK_R"] == 64)):
        return None  # (wider REGISTER_A tiles count 4 programs, and capped at 128 spilled 8 B)
    programs = fused_programs_per_sm(config, flags, arch, sms)
    return SM_REGISTERS // (programs * TILE_THREADS) // 8 * 8


def compute_bound_splits(m: int, r: int) -> int:
    """The most splits whose fp32 partial sums (8 x SPLIT_K x m bytes a column, written and read
    back) leave an m-row product over R at FUSED_SPLIT_COMPUTE_BOUND FLOPs a byte or more: still
    bound by the tensor cores, not DRAM, on every modelled card."""
    return max(0, int((2 * m * r / FUSED_SPLIT_COMPUTE_BOUND - r / 2) // (8 * max(m, 1))))


def _sms(device) -> int:
    """Multiprocessors of a torch device, or of anything with an `sms` attribute (the model's GPUs)."""
    return getattr(device, "sms", None) or _multiprocessors(device)


def fused_split_cost(tiles: int, trips: int, split_k: int, sms: int, per_sm: int, sum_loads: int) -> float:
    """Program-trips the busiest SM issues, or waits a latency for, when `tiles` output tiles of
    `trips` trips of R split `split_k` ways (FUSED_SPLIT_LATENCY_PROGRAMS): rounds of up to `per_sm`
    programs, each a split's trips plus FUSED_SPLIT_PROGRAM_TRIPS, then the last split's sum of
    SPLIT_K partial sums, `sum_loads` splits' loads an L2 round trip."""
    busiest = triton.cdiv(tiles * split_k, sms)
    rounds = triton.cdiv(busiest, per_sm)
    cost = rounds * (triton.cdiv(trips, split_k) + FUSED_SPLIT_PROGRAM_TRIPS) * max(min(busiest, per_sm),
                                                                                  FUSED_SPLIT_LATENCY_PROGRAMS)
    if split_k > 1:
        cost += FUSED_SPLIT_LATENCY_PROGRAMS * (1 + SPLIT_SUM_L2_LATENCY * triton.cdiv(split_k, sum_loads))
    return cost


def fused_split(m: int, tiles: int, r: int, config: dict, flags: dict, arch: int, device) -> tuple[int, int]:
    """(SPLIT_K, R per split) of an m-row fused launch with `tiles` output tiles on sm_<arch>.

    Decode-sized M (16-row tiles: 64-247 registers, 2-8 programs resident an SM) splits while the
    tiles number fewer than FUSED_SPLIT_BELOW_TILES_PER_SM an SM; larger tiles (110+ registers and
    41 KB of shared memory at 64 rows: 2-4 resident) only while they leave SMs idle: split to 4
    programs an SM they ran in two rounds, and the model put the RTX 4090's Llama-3-8B layer at
    M = 256 at 0.62x bf16 forward against 0.68x unsplit. Every split keeps at least
    FUSED_SPLIT_MIN_TRIPS tiles of R, the fp32 partial sums written and read back (8 x SPLIT_K x m
    bytes a column) within the packed weight's R / 2 bytes a column, and no more splits than
    gemv.split_sum_bound for the whole tile. Within that, a decode-sized M takes on the HBM archs the
    split of least fused_split_cost (ties: the more splits), on the GDDR archs the most up to
    fused_programs_per_sm programs an SM, never past them on the busiest SM; larger M the most up to
    them. `config`, `flags`: the launch's fused_config and fused_loop_flags. `device` may be
    anything with an `sms` attribute (the machine-code model's GPUs)."""
    sms = _sms(device)
    per_sm = fused_programs_per_sm(config, flags, arch, sms)
    block_r = config["BLOCK_R"]
    trips = triton.cdiv(r, block_r)
    split_k = 1
    if tiles < (FUSED_SPLIT_BELOW_TILES_PER_SM if m <= 16 else 1) * sms:
        most = max(1, min(trips // FUSED_SPLIT_MIN_TRIPS, max(r // (16 * max(m, 1)), compute_bound_splits(m, r)),
                          split_sum_bound(trips, config["BLOCK_M"], config["BLOCK_N"])))
        if m <= 16 and arch not in GDDR_ARCHS:
            splits = {triton.cdiv(trips, triton.cdiv(trips, split)) for split in range(1, most + 1)}
            split_k = min(splits, key=lambda split: (fused_split_cost(tiles, trips, split, sms, per_sm,
                                                                      flags["SUM_LOADS"]), -split))
        else:
            split_k = min(most, triton.cdiv(per_sm * sms, tiles))
            # Never a second round on the busiest SM: gate_proj's 224 tiles split 3 ways put 6
            # programs on some of the H100's 132 SMs, where 5 fit at 100 registers: 60.2 us in the
            # model against 40.1 us split 2 ways; on the A100 (128 registers, 4 fit) 2 ways put 5 on
            # some: 85.0 us against 72.1 unsplit.
            while m <= 16 and split_k > 1 and triton.cdiv(tiles * split_k, sms) > per_sm:
                split_k -= 1
    r_per_split = triton.cdiv(trips, split_k) * block_r
    return triton.cdiv(r, r_per_split), r_per_split


def fused_plan(m: int, dtype: torch.dtype, shape: Sequence[int], blocksize: int, transpose_weight: bool,
               double_quant: bool, arch: int, device, split_k: Optional[int] = None) -> tuple[dict, dict, int, int, int]:
    """(tile config, loop flags, output tiles, SPLIT_K, R per split) of an m-row fused launch on
    sm_<arch>: fused_split's rule, or `split_k` (a split larger than R's tiles is reduced to one tile
    of R per split; tiles past FUSED_SPLIT_MAX_PRODUCTS never split: fused_may_split). The launch,
    fused_workspace_shape and the machine-code model plan alike through here. `device`: a torch
    device, or anything with an `sms` attribute (the model's GPUs)."""
    r, cols, _, _ = weight_strides(shape, transpose_weight)
    config = fused_config(m, dtype, shape, blocksize, transpose_weight, arch)
    flags = fused_loop_flags(config, dtype, arch, m, transpose_weight, blocksize, double_quant)
    registers = fused_max_registers(config, flags, arch, _sms(device) if arch in GDDR_ARCHS else 0)
    if registers:  # a launch option, carried with the tile's
        config = {**config, "maxnreg": registers}
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(cols, config["BLOCK_N"])
    if not fused_may_split(config, blocksize, double_quant):
        split_k = 1
    if split_k is None:
        split_k, r_per_split = fused_split(m, tiles, r, config, flags, arch, device)
    else:
        r_per_split = triton.cdiv(triton.cdiv(r, config["BLOCK_R"]), max(1, split_k)) * config["BLOCK_R"]
        split_k = triton.cdiv(r, r_per_split)
    return config, flags, tiles, split_k, r_per_split


def fused_workspace_shape(m: int, shape: Sequence[int], blocksize: int, transpose_weight: bool, dtype: torch.dtype,
                          device: torch.device, double_quant: bool = True) -> tuple[int, int, int]:
    """fp32 partial sums of a fused launch: [SPLIT_K, M, cols] (SPLIT_K = 1: none are written)."""
    _, cols, _, _ = weight_strides(shape, transpose_weight)
    split_k = fused_plan(m, dtype, shape, blocksize, transpose_weight, double_quant, target_arch(device), device)[3]
    return split_k, m, cols


def matmul_4bit_fused(
    a: torch.Tensor,
    weight: Packed4bit,
    transpose_weight: bool,
    bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """a [M, R] (any strides) @ (W^T if transpose_weight else W) (+ bias) -> [M, cols] in a's dtype.

    `workspace`: fp32 of fused_workspace_shape(...) for a graph-captured call (no initialisation
    needed). `split_k` overrides fused_split's rule (the machine-code model compiles both variants;
    a split larger than R's tiles is reduced to one tile of R per split; tiles past
    FUSED_SPLIT_MAX_PRODUCTS never split: fused_may_split)."""
    check_weight(weight)
    check_matmul_input(a, weight, transpose_weight, bias)
    shape, blocksize = weight.shape, weight.blocksize
    check_triton_size(shape)
    r, cols, w_stride_r, w_stride_c = weight_strides(shape, transpose_weight)
    m = a.shape[0]
    out = _output(out, (m, cols), a)
    if m == 0:
        return out  # nothing to launch: a grid of 0 programs is an error on CUDA
    packed, absmax, nested_absmax, nested_code, offset, double_quant = weight_pointers(weight)
    config, flags, tiles, split_k, r_per_split = fused_plan(m, a.dtype, shape, blocksize, transpose_weight, double_quant,
                                                           target_arch(a.device), a.device, split_k)
    if split_k > 1:
        from qlora.kernels.nf4.gemv import split_counters

        if workspace is None:
            workspace = torch.empty((split_k, m, cols), dtype=torch.float32, device=a.device)
        elif (tuple(workspace.shape) != (split_k, m, cols) or workspace.dtype != torch.float32
              or not workspace.is_contiguous() or workspace.device != a.device):
            raise ValueError(f"workspace must be a contiguous fp32 {[split_k, m, cols]} tensor on {a.device} "
                             f"(fused_workspace_shape), got {list(workspace.shape)} {workspace.dtype} on {workspace.device}")
        counters = split_counters(a.device, tiles)
    else:
        workspace = counters = out  # never read: DIRECT_STORE
    launch(
        _matmul_4bit_kernel, (tiles, split_k),
        a, out, bias if bias is not None else out, workspace, counters,
        packed, absmax, weight.code, nested_absmax, nested_code, offset,
        m, cols, r, r_per_split, split_k, shape[1], a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        w_stride_r, w_stride_c,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=weight.nested_blocksize, DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None,
        GROUP_M=8, INPUT_PRECISION=input_precision(a.dtype), TRANSPOSED=transpose_weight, DIRECT_STORE=split_k == 1,
        **config, **flags,
        # No contraction: W must decode to the same bits here as in the dequantize kernel (the
        # double-quant scale code * absmax + offset is a multiply, then an add). The products run
        # on tensor cores (tl.dot), which fp fusion does not touch.
        enable_fp_fusion=False,
    )
    return out


def _output(out: Optional[torch.Tensor], shape: tuple[int, int], a: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=a.dtype, device=a.device)
    if tuple(out.shape) != shape or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"out must be a {list(shape)} {a.dtype} tensor on {a.device}, "
                         f"got {list(out.shape)} {out.dtype} on {out.device}")
    return out
