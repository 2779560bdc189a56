"""Triton: the grouped 4-bit matmul of mixture-of-experts layers, every expert in one launch.

Rows of the input are sorted by expert, counts[e] of them for expert e (some experts have none). One
kernel serves both products of the frozen expert linears, as kernels/nf4/matmul.py does for one weight:
- forward  Y[rows of e]  = X[rows of e]  @ W_e^T  (R = in,  cols = out);
- backward dX[rows of e] = dY[rows of e] @ W_e    (R = out, cols = in).
W_e's tiles are decoded inside the R loop by kernels/nf4's decode_row_tile (decode_row_tile_bytes for
backward tiles past 16 rows) / decode_4bit on expert e's slice of the stack (its bytes, scales and
double-quant state sit at e times a row stride), so no dense W of any expert exists in memory and each
expert decodes to the same bits as the dense 4-bit kernels.

The schedule needs no host sync (so a step stays CUDA-graph capturable): the grid is an upper bound
on the row tiles, min(T, cdiv(T, BLOCK_M) + min(E, T)) (each expert with tokens wastes less than one
tile), times the column tiles. Each program reads the E counts (512 B at E = 128, from L2), takes the
cumulative sum of tiles per expert and finds its expert by counting the experts whose tiles end at or
before its own; programs past the last tile return at once. Row tiles run in groups of GROUP_M that
share each W column tile while it is in L2 (the dense kernel's order); a group spans one or two
experts, so an expert's 4-bit tile is read about once per GROUP_M of its row tiles. Where that grid
leaves SMs idle (decode against a long reduction), a second grid axis splits the reduction into fp32
partial sums that the launcher adds in a fixed order (split_k).

The twin is reference.grouped_matmul_torch.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qlora.kernels.launch import launch, target_arch
from qlora.kernels.moe.checks import check_experts, check_grouped_input
from qlora.kernels.moe.packed import PackedExperts4bit
from qlora.kernels.nf4.checks import check_triton_size
from qlora.kernels.nf4.dequantize import decode_row_tile, decode_stored_tile, word_aligned
from qlora.kernels.nf4.matmul import fused_config, input_precision, weight_strides


@triton.jit
def _grouped_matmul_4bit_kernel(
    a_ptr, out_ptr, partial_ptr, counts_ptr,
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    T, COLS, R, IN_FEATURES, NUM_EXPERTS, TILES_M,
    stride_am, stride_ar, stride_om, stride_oc, w_stride_r, w_stride_c,
    packed_stride_e, absmax_stride_e, nested_stride_e, R_PER_SPLIT,
    SPLIT_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    EXPERTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(COLS, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(TILES_M - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    # This row tile's expert: the first whose cumulative tile count passes pid_m (EXPERTS = E rounded
    # up to a power of two; the padding experts have no tokens).
    expert_ids = tl.arange(0, EXPERTS)
    counts = tl.load(counts_ptr + expert_ids, mask=expert_ids < NUM_EXPERTS, other=0).to(tl.int32)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    if expert >= NUM_EXPERTS:  # past the last row tile: the grid is an upper bound
        return
    this = expert_ids == expert
    first_tile = tl.sum(tl.where(this, tiles_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(this, tl.cumsum(counts, 0) - counts, 0), 0)
    row_end = tl.minimum(row_start + tl.sum(tl.where(this, counts, 0), 0), T)  # never past the input's rows

    # Expert e's slice of the stack; int64: E * bytes per expert passes 2**31 for the largest MoEs
    # (DeepSeek-V3: 256 experts x 7.3 MB per projection = 1.9 GB).
    e64 = expert.to(tl.int64)
    packed_ptr += e64 * packed_stride_e
    absmax_ptr += e64 * absmax_stride_e
    if DOUBLE_QUANT:
        nested_absmax_ptr += e64 * nested_stride_e
        offset_ptr += e64

    offs_m = row_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < row_end
    mask_n = offs_n < COLS
    # int64 row offsets: T * stride passes 2**31 at T = 150K rows of a 14336-wide input.
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Split-K: program (., s) sums R_PER_SPLIT (a multiple of BLOCK_R, so row tiles stay block-aligned) of R.
    r_start = tl.program_id(1) * R_PER_SPLIT
    for r0 in range(r_start, tl.minimum(r_start + R_PER_SPLIT, R), BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        a = tl.load(a_rows + offs_r[None, :].to(tl.int64) * stride_ar, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if WHOLE_BLOCKS and TRANSPOSED:  # B = W_e^T: decode W_e[cols tile, r tile] along its rows, transpose
            w = tl.trans(decode_row_tile(packed_ptr, offs_n, mask_n, r0, IN_FEATURES, absmax_ptr, code_ptr,
                                         nested_absmax_ptr, nested_code_ptr, offset_ptr, BLOCK_R, BLOCKSIZE,
                                         NESTED_BLOCKSIZE, DOUBLE_QUANT))
        elif WHOLE_BLOCKS and BLOCK_M == 16:  # B = W_e: the tile is W_e[r tile, cols tile] as stored
            w = decode_row_tile(packed_ptr, offs_r, mask_r, pid_n * BLOCK_N, IN_FEATURES, absmax_ptr, code_ptr,
                                nested_absmax_ptr, nested_code_ptr, offset_ptr, BLOCK_N, BLOCKSIZE, NESTED_BLOCKSIZE,
                                DOUBLE_QUANT)
        else:  # larger backward tiles by bytes (64-row ones spilled 16 B on sm_80 with words); any shape by element
            w = decode_stored_tile(packed_ptr, offs_r, mask_r, offs_n, mask_n, pid_n * BLOCK_N, w_stride_r, w_stride_c,
                                   IN_FEATURES, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                   BLOCK_N, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, WHOLE_BLOCKS, BLOCK_M == 16)
        # W_e rounded to the input dtype once, as the twin's dequantize-then-matmul does; fp32 accumulation.
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :].to(tl.int64) * stride_oc,
                 acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # fp32 partial sums [SPLIT_K, T, COLS], summed in a fixed order by the launcher: deterministic
        partial = partial_ptr + (tl.program_id(1).to(tl.int64) * T + offs_m.to(tl.int64)[:, None]) * COLS + offs_n[None, :]
        tl.store(partial, acc, mask=mask)


def rows_per_expert(rows: int, num_experts: int) -> int:
    """The rows an active expert gets with balanced routing, what picks the tile height without reading
    the counts (a device sync): decode (a few tokens x top-k) is ~1 row per expert -> 16-row tiles,
    prefill (Qwen3-30B-A3B: 4096 tokens x 8 over 128 experts) ~256 -> 128-row tiles (grouped_config)."""
    return -(-rows // max(1, min(num_experts, rows)))


def row_tiles_bound(rows: int, num_experts: int, block_m: int) -> int:
    """Most row tiles any counts summing to `rows` can need: sum_e ceil(c_e / BLOCK_M) <= cdiv(rows,
    BLOCK_M) + (experts with tokens), at most min(E, rows) experts have tokens, and every tile holds a
    row (decode is exact: one token of Qwen3-30B-A3B is 8 tiles of one row)."""
    return min(rows, triton.cdiv(rows, block_m) + min(num_experts, rows))


def grouped_config(rows: int, dtype: torch.dtype, experts: PackedExperts4bit, transpose_weight: bool, arch: int) -> dict:
    """The tile constexprs and launch options: the dense fused kernel's for one expert at the rows an
    active expert gets (nf4.matmul.fused_config: tiles within the arch's shared memory, no spills)."""
    per_expert = rows_per_expert(rows, experts.num_experts)
    config = fused_config(per_expert, dtype, experts.expert_shape, experts.blocksize, transpose_weight, arch)
    heavy_decode = not config["WHOLE_BLOCKS"] or config["BLOCK_N"] * config["BLOCK_R"] > 4096
    # Prefill and training rows (>= 128 per expert, 16-bit): 128-row tiles decode each W tile for twice
    # the rows. In the machine-code model (benchmarks/moe_kernels_static.py, sm_90, 4096 tokens) the
    # decode's instructions bound the 64-row kernel at 1.9x (Qwen3-30B-A3B gate_up) to 3x (Mixtral) its
    # tensor-core time; 128 rows cut that to 346 from 641 us and to 3147 from 5838 us. 159 registers and
    # 58 KB of shared memory on sm_90, no spill on any arch (tests/test_moe_kernels.py).
    if per_expert >= 128 and dtype != torch.float32 and not heavy_decode:
        config = dict(config, BLOCK_M=128)
    # The expert lookup keeps a few more values live than the dense kernel, and the backward product's
    # 64-row tiles are then at the register limit where the decode is heavy: at blocksize 256 (64 x 256
    # x 32 tiles) 255 registers and 16 B of spill on sm_80 (246-250, no spill, on sm_86/89/90); with the
    # per-element decode (in % blocksize != 0) 255 registers and 24-40 B of spill on sm_80/86/89.
    # 32-row tiles there compile without spills on every arch (tests/test_moe_kernels.py).
    if not transpose_weight and config["BLOCK_M"] > 32 and heavy_decode:
        config = fused_config(32, dtype, experts.expert_shape, experts.blocksize, transpose_weight, arch)
    return config


# SMs of the machine-code model's GPUs (A100, A10, L4, H100 SXM): the split-K choice where no GPU is
# present (compile_only, the interpreter).
MULTIPROCESSORS = {80: 108, 86: 72, 89: 58, 90: 132}


def multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return MULTIPROCESSORS.get(target_arch(device), 132)


def split_k(programs: int, r: int, block_r: int, sms: int) -> tuple[int, int]:
    """(SPLIT_K, R per split): where the grid leaves SMs idle, the reduction is split until there are
    about two programs per SM, each split at least 4 tiles of R. Decode needs it where few column tiles
    meet a long reduction: Mixtral's down projection (4096 x 14336) at one token is 2 experts x 64
    column tiles = 128 programs for 132 SMs, each looping 224 times: 0.92x of bf16 in the model, 1.7x
    split in 3. A grid that fills the SMs is not split: the partial sums cost two more launches (the
    fixed-order sum and the cast), 5 us in the model, a third of a Qwen3-30B-A3B decode projection."""
    tiles_r = triton.cdiv(r, block_r)
    if programs >= sms:
        return 1, tiles_r * block_r
    split = max(1, min(triton.cdiv(2 * sms, max(programs, 1)), tiles_r // 4))
    r_per_split = triton.cdiv(tiles_r, split) * block_r
    return triton.cdiv(r, r_per_split), r_per_split


def expert_pointers(experts: PackedExperts4bit):
    """Kernel arguments of the stack: (packed bytes, absmax, nested absmax, nested code, offset, their
    per-expert strides (bytes, absmax, nested absmax) and double quant), dummies for absent DQ tensors."""
    packed = word_aligned(experts.packed_bytes())
    absmax = experts.absmax.reshape(experts.num_experts, -1)
    if not experts.double_quant:
        # exact: fp16/bf16 values are fp32 values; the interpreter cannot load bf16
        absmax = absmax.float().contiguous()
        return packed, absmax, absmax, absmax, absmax, (packed.stride(0), absmax.stride(0), 0), False
    # Rows of a wider stack (one matrix of a fused projection, qlora.quant.nf4.experts.segment_stack) keep
    # their per-expert stride: only a row that is not contiguous within itself is copied.
    rows = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    packed, absmax = rows(packed), rows(absmax)
    nested_absmax = rows(experts.nested_absmax.reshape(experts.num_experts, -1))
    return (packed, absmax, nested_absmax, experts.nested_code.contiguous(), experts.offset.reshape(-1).contiguous(),
            (packed.stride(0), absmax.stride(0), nested_absmax.stride(0)), True)


def grouped_matmul_4bit(a: torch.Tensor, experts: PackedExperts4bit, counts: torch.Tensor, transpose_weight: bool,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a [T, R] (any strides, rows sorted by expert, counts[e] rows for expert e) @ (W_e^T if
    transpose_weight else W_e) per expert -> [T, cols] in a's dtype, one launch."""
    check_experts(experts)
    check_grouped_input(a, counts, experts, transpose_weight)
    check_triton_size(experts.expert_shape)
    r, cols, w_stride_r, w_stride_c = weight_strides(experts.expert_shape, transpose_weight)
    rows = a.shape[0]
    if out is None:
        out = torch.empty((rows, cols), dtype=a.dtype, device=a.device)
    elif tuple(out.shape) != (rows, cols) or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"out must be a {[rows, cols]} {a.dtype} tensor on {a.device}, "
                         f"got {list(out.shape)} {out.dtype} on {out.device}")
    if rows == 0:
        return out  # nothing to launch: a grid of 0 programs is an error on CUDA
    packed, absmax, nested_absmax, nested_code, offset, (packed_stride, absmax_stride, nested_stride), double_quant = \
        expert_pointers(experts)
    config = grouped_config(rows, a.dtype, experts, transpose_weight, target_arch(a.device))
    tiles_m = row_tiles_bound(rows, experts.num_experts, config["BLOCK_M"])
    programs = tiles_m * triton.cdiv(cols, config["BLOCK_N"])
    split, r_per_split = split_k(programs, r, config["BLOCK_R"], multiprocessors(a.device))
    # Split-K partial sums: split x T x cols fp32 (at decode 2 rows x 4096 x 4 splits = 128 KB).
    partial = torch.empty((split, rows, cols), dtype=torch.float32, device=a.device) if split > 1 else out
    launch(
        _grouped_matmul_4bit_kernel, (programs, split),
        a, out, partial, counts,
        packed, absmax, experts.code, nested_absmax, nested_code, offset,
        rows, cols, r, experts.shape[2], experts.num_experts, tiles_m,
        a.stride(0), a.stride(1), out.stride(0), out.stride(1), w_stride_r, w_stride_c,
        packed_stride, absmax_stride, nested_stride, r_per_split, SPLIT_K=split,
        BLOCKSIZE=experts.blocksize, NESTED_BLOCKSIZE=experts.nested_blocksize, DOUBLE_QUANT=double_quant,
        EXPERTS=triton.next_power_of_2(experts.num_experts), GROUP_M=8, INPUT_PRECISION=input_precision(a.dtype),
        TRANSPOSED=transpose_weight, **config,
        # No contraction: W_e must decode to the same bits as in the dequantize kernel and the twin
        # (the double-quant scale is a multiply, then an add). tl.dot is untouched by fp fusion.
        enable_fp_fusion=False,
    )
    if split > 1:  # one fixed-order sum in fp32, one rounding to the output dtype
        out.copy_(partial.sum(0))
    return out
