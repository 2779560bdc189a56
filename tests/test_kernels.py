"""The Triton kernels against the pure-PyTorch reference, the backend switch, the custom ops.

Three kinds of test live here:
- `test_interp_*`: the Triton kernels on CPU through the Triton interpreter. The interpreter is
  chosen when a kernel is decorated, from TRITON_INTERPRET at that moment, so these run in a child
  pytest with TRITON_INTERPRET=1 (`test_triton_kernels_in_interpreter` starts it); the rest of the
  suite never sees interpreter mode. `TRITON_INTERPRET=1 pytest tests/test_kernels.py -k interp_`
  runs them directly. fp16/fp32 only: the interpreter cannot do bf16 arithmetic. Small shapes:
  the interpreter runs a 96x320 matmul in ~0.2 s.
- CPU tests of the dispatch, the errors and torch.compile over the custom ops (torch backend).
- `test_gpu_*`: real sizes in bf16/fp16 on CUDA, skipped without it.
"""
import os

import pytest
import torch
import triton
import triton.language as tl

import qlora
from qlora.kernels import linear_4bit, set_backend
from qlora.kernels.nf4 import ops, reference
from qlora.kernels import backend
from qlora.kernels.backend import use_triton
from qlora.kernels.nf4.dequantize import mma_k_order, mma_row_order, mma_row_order_inverse
from helpers import rel_err, run_interpreter_child

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child (test_triton_kernels_in_interpreter)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Relative error vs fp64 math on the same dequantized weight (rounded to the compute dtype): fp32
# products differ from fp64 by ~1e-7, fp16 outputs by one rounding (~2e-4 measured).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture
def triton_backend():
    set_backend("triton")
    yield
    set_backend(None)


def quantized(shape, quant_type="nf4", blocksize=64, double_quant=True, storage=torch.uint8, device="cpu"):
    w = torch.randn(shape, device=device) * 0.05
    packed, state = qlora.quantize_4bit(w, quant_type, blocksize, double_quant, quant_storage=storage)
    return state.packed_view(packed)


def dense(weight, dtype):
    """The fp64 weight the kernels compute with: dequantized exactly, rounded to the compute dtype."""
    return reference.dequantize_4bit_torch(weight, torch.float32).to(dtype).double()


def nan_like(shape, dtype, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ---- the interpreter child ----------------------------------------------------------------------
@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run itself")
def test_triton_kernels_in_interpreter():
    run_interpreter_child(__file__)


# ---- dequantize ---------------------------------------------------------------------------------
DEQUANT_CASES = [
    # (shape, quant_type, blocksize, double_quant, storage): odd numel, a partial last block, more
    # than 256 blocks (two nested blocks), every storage dtype.
    ((37, 95), "nf4", 64, True, torch.uint8),
    ((96, 320), "fp4", 128, False, torch.float16),
    ((50, 300), "nf4", 128, False, torch.bfloat16),
    ((64, 330), "fp4", 64, True, torch.float32),
]


@interpreter_only
@pytest.mark.parametrize("shape, quant_type, blocksize, double_quant, storage", DEQUANT_CASES)
def test_interp_dequantize_bit_exact(shape, quant_type, blocksize, double_quant, storage):
    from qlora.kernels.nf4.dequantize import dequantize_4bit_triton

    weight = quantized(shape, quant_type, blocksize, double_quant, storage)
    for dtype in (torch.float32, torch.float16):
        out = dequantize_4bit_triton(weight, dtype, out=nan_like(shape, dtype))
        assert torch.equal(out, reference.dequantize_4bit_torch(weight, dtype)), dtype


@interpreter_only
def test_interp_dequantize_float_storage_with_nan_bit_patterns():
    # Every byte value, fp16 storage: some 16-bit words are NaNs, which float arithmetic would
    # canonicalise. Reinterpreted as bytes they must decode exactly like the uint8 packing.
    from qlora.kernels.nf4.dequantize import dequantize_4bit_triton

    shape = (40, 64)
    weight = quantized(shape, "nf4", 64, True)
    packed_bytes = torch.randint(0, 256, weight.packed.shape, dtype=torch.uint8)
    packed_bytes[:256, 0] = torch.arange(256, dtype=torch.uint8)
    as_fp16 = packed_bytes.reshape(-1).view(torch.float16)
    assert as_fp16.isnan().any()
    out = dequantize_4bit_triton(weight._replace(packed=as_fp16), torch.float32, out=nan_like(shape, torch.float32))
    assert torch.equal(out, reference.dequantize_4bit_torch(weight._replace(packed=packed_bytes), torch.float32))


# ---- matmul: fused, GEMV and dequantize-then-matmul, forward and backward -----------------------
MATMUL_CASES = [
    # (M, out, in, quant_type, blocksize, double_quant): M=37 is not a multiple of any tile; in=321
    # makes the numel odd, so bytes straddle rows and blocks straddle rows (per-element decode).
    # The others decode whole row tiles (in % blocksize == 0): in=96 ends mid-tile, blocksize 128
    # widens the tile, 50 rows end mid-tile.
    (37, 96, 320, "nf4", 64, True),
    (5, 37, 321, "fp4", 128, False),
    (19, 50, 96, "nf4", 32, False),
    (3, 64, 384, "fp4", 128, True),
]


@interpreter_only
@pytest.mark.parametrize("quant_type, blocksize, double_quant", (("nf4", 64, True), ("fp4", 32, False)))
@pytest.mark.parametrize("kernel, arch", (("fused", 90), ("fused", 80), ("gemv", 90)))
def test_interp_row_tile_decode_is_bit_exact(kernel, arch, quant_type, blocksize, double_quant):
    # W as the matmul kernels decode it must be the dequantized W bit for bit. With fp32 one-hot
    # rows a product is one code * scale plus exact zeros (the fused fp32 dot is "ieee"), so the
    # output must be W itself, with every byte value 0..255 in the packing.
    from qlora.kernels.launch import interpreted_as
    from qlora.kernels.nf4.gemv import gemv_4bit
    from qlora.kernels.nf4.matmul import matmul_4bit_fused

    weight = quantized((48, 64), quant_type, blocksize, double_quant)
    packed = torch.randint(0, 256, weight.packed.shape, dtype=torch.uint8)
    packed.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    weight = weight._replace(packed=packed)
    w = reference.dequantize_4bit_torch(weight, torch.float32)
    for transpose_weight, expected in ((True, w.T), (False, w)):
        eye = torch.eye(expected.shape[0], dtype=torch.float32)
        if kernel == "fused":
            out = matmul_4bit_fused(eye, weight, transpose_weight)
        else:
            out = gemv_4bit(eye, weight, transpose_weight)
        assert torch.equal(out, expected), (transpose_weight, (out - expected).abs().max())
        # 16-bit decode-sized products take other loops (tiles fetched a trip ahead, W the MMA's A
        # operand as decoded, relabelled for sm_90's warpgroup MMA or sm_80's mma.sync, 8 input rows
        # on sm_80 at M <= 8, there at M = 1 the input the B operand as loaded): one-hot rows 16, 5
        # and 1 at a time (fused) and one at a time (GEMV) must still give W rounded to fp16, bit for bit.
        eye16, expected16 = eye.half(), expected.half()
        if kernel == "fused":
            last = eye16.shape[0] - 1
            with interpreted_as(arch):
                for rows, firsts in ((16, range(0, last + 1, 16)), (5, range(0, last + 1, 5)), (1, (0, 17, last))):
                    for first in firsts:
                        got = matmul_4bit_fused(eye16[first:first + rows], weight, transpose_weight)
                        assert torch.equal(got, expected16[first:first + rows]), (transpose_weight, first, rows)
        else:
            for row in (0, 17, eye16.shape[0] - 1):
                got = gemv_4bit(eye16[row:row + 1], weight, transpose_weight)
                assert torch.equal(got, expected16[row:row + 1]), (transpose_weight, row)


def forward_and_grad_input(m, out_features, in_features, quant_type, blocksize, double_quant, dtype):
    """A quantized weight and its two products, (a, transpose_weight, bias, fp64 expected): the forward
    X W^T + b (X with non-contiguous rows) and the backward to the input dY W."""
    weight = quantized((out_features, in_features), quant_type, blocksize, double_quant)
    w = dense(weight, dtype)
    x = torch.randn(in_features, m, dtype=dtype).T  # non-contiguous rows
    grad_y = torch.randn(m, out_features, dtype=dtype)
    bias = torch.randn(out_features, dtype=dtype)
    return weight, [(x, True, bias, x.double() @ w.T + bias.double()), (grad_y, False, None, grad_y.double() @ w)]


@interpreter_only
@pytest.mark.parametrize("m, out_features, in_features, quant_type, blocksize, double_quant", MATMUL_CASES)
@pytest.mark.parametrize("kernel", ("fused", "fused_sm80", "gemv"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_interp_kernel_forward_and_grad_input(kernel, dtype, m, out_features, in_features, quant_type, blocksize, double_quant):
    # fused_sm80: the fused kernel with sm_80's loop flags (launch.interpreted_as), the H100's otherwise.
    from qlora.kernels.launch import interpreted_as
    from qlora.kernels.nf4.gemv import gemv_4bit, gemv_workspace_shape
    from qlora.kernels.nf4.matmul import matmul_4bit_fused

    weight, products = forward_and_grad_input(m, out_features, in_features, quant_type, blocksize, double_quant, dtype)
    for a, transpose_weight, b, expected in products:
        out = nan_like(tuple(expected.shape), dtype)
        if kernel.startswith("fused"):
            with interpreted_as(80 if kernel == "fused_sm80" else 90):
                matmul_4bit_fused(a, weight, transpose_weight, bias=b, out=out)
        else:
            workspace = nan_like(gemv_workspace_shape(m, weight.shape, weight.blocksize, transpose_weight, a.device),
                                 torch.float32)
            assert workspace.shape[0] > 1  # split-K really splits here
            gemv_4bit(a, weight, transpose_weight=transpose_weight, bias=b, out=out, workspace=workspace)
        assert not out.isnan().any()
        assert rel_err(out, expected) < TOLERANCE[dtype], (transpose_weight, rel_err(out, expected))


@interpreter_only
def test_interp_gemv_last_split_leaves_counters_zero_and_repeats_bit_for_bit():
    # The last split of each output tile sums the partial sums and zeroes its arrival counter: a
    # counter left non-zero would make the next launch's last split miss its turn (output unwritten).
    from qlora.kernels.nf4 import gemv

    weight = quantized((96, 320))
    a = torch.randn(3, 320, dtype=torch.float16)
    first = gemv.gemv_4bit(a, weight)
    tiles = gemv.gemv_workspace_shape(3, weight.shape, weight.blocksize, True, a.device)
    assert tiles[0] > 1  # split-K really splits here
    assert not gemv.split_counters(a.device, 1).any()
    second = gemv.gemv_4bit(a, weight, out=nan_like(tuple(first.shape), torch.float16))
    assert torch.equal(first, second)


@interpreter_only
@pytest.mark.parametrize("m, out_features, in_features, quant_type, blocksize, double_quant, arch",
                         [(5, 37, 321, "fp4", 128, False, 90), (19, 50, 192, "nf4", 32, True, 90),
                          (3, 96, 320, "nf4", 64, True, 90), (1, 100, 1088, "nf4", 64, True, 90),
                          (1, 100, 1088, "nf4", 64, True, 80)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_interp_fused_split_k_forward_and_grad_input(dtype, m, out_features, in_features, quant_type, blocksize,
                                                     double_quant, arch):
    # Split-K in the fused kernel: the last split of each output tile adds the fp32 partial sums in
    # split order, adds the bias and zeroes its counter; per-element decode (in=321) and row tiles
    # that end mid-tile (50 rows, 37 rows), forward and dX, against fp64 products of the twin's W. At
    # M = 1 the 16-bit forward stores and sums one row, 8 splits at a time on sm_90 (17 splits take
    # three rounds) and 16 on sm_80 (two); its 100 columns end mid-tile.
    from qlora.kernels.launch import interpreted_as
    from qlora.kernels.nf4 import gemv
    from qlora.kernels.nf4.matmul import fused_config, fused_may_split, matmul_4bit_fused

    def fused(*args, **kwargs):
        with interpreted_as(arch):
            return matmul_4bit_fused(*args, **kwargs)

    weight, products = forward_and_grad_input(m, out_features, in_features, quant_type, blocksize, double_quant, dtype)
    for a, transpose_weight, b, expected in products:
        whole = fused(a, weight, transpose_weight, bias=b, split_k=1)
        r, cols = a.shape[1], expected.shape[1]
        config = fused_config(m, dtype, weight.shape, blocksize, transpose_weight, arch)
        for split_k in (2, 3, 5) + ((17,) if m == 1 else ()):  # 5 (17 at M = 1): past one round of loads
            # A split past R's tiles is reduced to one tile a split, as the launcher does.
            block_r = config["BLOCK_R"]
            splits = triton.cdiv(r, triton.cdiv(triton.cdiv(r, block_r), split_k) * block_r)
            if not fused_may_split(config, blocksize, double_quant):
                splits = 1
            out = nan_like(tuple(expected.shape), dtype)
            workspace = nan_like((splits, m, cols), torch.float32) if splits > 1 else None
            fused(a, weight, transpose_weight, bias=b, out=out, workspace=workspace, split_k=split_k)
            assert not out.isnan().any()
            assert not gemv.split_counters(a.device, 1).any()  # every tile's counter is zero again
            assert rel_err(out, expected) < TOLERANCE[dtype], (transpose_weight, split_k, rel_err(out, expected))
            if splits > 1:  # the last split adds the workspace's partial sums in split order, then the bias
                ordered = torch.zeros(m, cols, dtype=torch.float32)
                for partial in workspace:
                    ordered = ordered + partial
                if b is not None:
                    ordered = ordered + b.float()
                assert torch.equal(out, ordered.to(dtype)), (transpose_weight, split_k, splits)
            again = fused(a, weight, transpose_weight, bias=b, split_k=split_k)
            assert torch.equal(out, again)  # the same sum in the same order, whichever split came last
        assert rel_err(whole, expected) < TOLERANCE[dtype]


def test_split_k_stops_where_the_sum_outgrows_the_split():
    # A k_proj at M = 1 on an H100 (132 SMs): 16 column tiles of 64 trips of R. Towards 6 programs an
    # SM it would split 32 ways: 2 trips a split, and the last split's sum 8 L2 round trips (4 splits'
    # loads a trip). split_sum_bound stops at 16: 4 trips a split, 4 round trips.
    from types import SimpleNamespace

    from qlora.kernels.nf4.gemv import gemv_block_sizes, gemv_split, split_sum_bound
    from qlora.kernels.nf4.matmul import fused_config, fused_loop_flags, fused_split

    h100 = SimpleNamespace(sms=132)
    config = fused_config(1, torch.bfloat16, (1024, 4096), 64, True, 90)
    flags = fused_loop_flags(config, torch.bfloat16, 90, 1, True, 64, True)
    assert fused_split(1, 16, 4096, config, flags, 90, h100) == (16, 256) and split_sum_bound(64, 16, 64) == 16
    block_m, block_n, block_r, _ = gemv_block_sizes(1, (1024, 4096), 64, True)
    split, _ = gemv_split(1, 1024, 4096, block_m, block_n, block_r, h100)
    assert split <= split_sum_bound(4096 // block_r, block_m, block_n)


def test_split_k_past_decode_keeps_the_product_compute_bound():
    # A k_proj at M = 256 on an RTX 4090 (128 SMs): 64 tiles of 64 x 64 leave half the SMs idle.
    # Split 2 ways the fp32 partial sums (8 B x 2 x 256 a column) outweigh the 4-bit weight (2 KB a
    # column), yet the product stays at 2 x 256 x 4096 / 6144 = 341 FLOPs a byte, past every card's
    # balance (FUSED_SPLIT_COMPUTE_BOUND): it splits. 3 ways would fall to 293.
    from types import SimpleNamespace

    from qlora.kernels.nf4.matmul import compute_bound_splits, fused_config, fused_loop_flags, fused_split

    assert compute_bound_splits(256, 4096) == 2 and compute_bound_splits(16, 4096) == 0
    config = fused_config(256, torch.bfloat16, (1024, 4096), 64, True, 89)
    flags = fused_loop_flags(config, torch.bfloat16, 89, 256, True, 64, True)
    assert fused_split(256, 64, 4096, config, flags, 89, SimpleNamespace(sms=128))[0] == 2


def test_split_k_counts_the_busiest_sms_rounds():
    # H100 (132 SMs), M = 1, 7 decode programs fit an SM. Llama-3-70B's gate_proj has 448 column
    # tiles of 128 trips: unsplit, the busiest SM runs 4 programs of 128 trips, too few to hide a
    # latency ((128 + 2) x 5 program-trips); split 2 ways, 7 programs of 64 trips in one round
    # ((64 + 2) x 7, and the sum); 7 ways, 24 programs in 4 rounds of 7 (19 trips each). A 4096 x
    # 4096 product has 64 tiles of 64 trips, each program's prologue and epilogue counted as 2 more:
    # 11 ways put 6 programs of 6 trips on the busiest SM ((6 + 2) x 6 program-trips), 10 ways 5 of
    # 7 ((7 + 2) x 5), 8 ways 4 of 8, short of the 5 that hide a latency ((8 + 2) x 5); a latency (5)
    # and 0.6 of one per 8 partial sums for the sum. The GDDR archs keep to their programs an SM.
    from types import SimpleNamespace

    from qlora.kernels.nf4.matmul import fused_plan, fused_split_cost

    h100 = SimpleNamespace(sms=132)

    def split(shape, arch=90, device=h100):
        return fused_plan(1, torch.bfloat16, shape, 64, True, True, arch, device)[3]

    assert split((28672, 8192)) == 2 and split((4096, 4096)) == 10
    assert [fused_split_cost(448, 128, k, 132, 7, 8) for k in (1, 2, 7)] == [650, 470.0, 596.0]
    assert [fused_split_cost(64, 64, k, 132, 7, 8) for k in (8, 10, 11)] == [58.0, 56.0, 59.0]
    rtx_4090 = SimpleNamespace(sms=128)
    assert split((28672, 8192), 89, rtx_4090) == 1 and split((4096, 4096), 89, rtx_4090) == 6


def test_split_k_aims_at_the_programs_the_card_needs():
    # Decode tiles on the HBM archs run in rounds of the programs that fit: 6 (7 of sm_80's 8-row
    # loop at M <= 8 and of sm_90's tile, 64-72 registers with the code table loaded once; backward,
    # 5 on sm_90 and 4 on sm_80); on the GDDR archs, bound by DRAM, the
    # split aims at about 320 programs in all (each split adds fp32 partial sums to the bytes): 4
    # an SM on an RTX 3090's 82 SMs, 3 on a 4090's 128, never past the 4 that fit other tiles.
    from qlora.kernels.nf4.matmul import fused_config, fused_loop_flags, fused_programs_per_sm

    def per_sm(arch, sms, m=1, transpose_weight=True):
        config = fused_config(m, torch.bfloat16, (4096, 4096), 64, transpose_weight, arch)
        flags = fused_loop_flags(config, torch.bfloat16, arch, m, transpose_weight, 64, True)
        return fused_programs_per_sm(config, flags, arch, sms)

    assert (per_sm(80, 108), per_sm(80, 108, 16), per_sm(90, 132), per_sm(86, 82), per_sm(89, 128),
            per_sm(89, 58)) == (7, 6, 7, 4, 3, 4)
    assert (per_sm(90, 132, 1, False), per_sm(80, 108, 1, False)) == (5, 4)


@interpreter_only
def test_interp_fused_split_rule_splits_only_when_tiles_leave_sms_idle():
    # The interpreter's device counts as 4 SMs: a 16-row decode product with 2 column tiles splits
    # its 16 tiles of R (in 4: the partial sums stay within the weight's bytes), a 512-row one (16
    # tiles of 64 rows for 4 SMs) does not.
    from qlora.kernels.nf4.matmul import fused_workspace_shape, matmul_4bit_fused

    weight = quantized((96, 1024))
    device = torch.device("cpu")
    split_k = fused_workspace_shape(16, weight.shape, 64, True, torch.float16, device)[0]
    assert split_k == 4
    assert fused_workspace_shape(512, weight.shape, 64, True, torch.float16, device)[0] == 1
    a = torch.randn(16, 1024, dtype=torch.float16)
    expected = a.double() @ dense(weight, torch.float16).T.double()
    workspace = nan_like((split_k, 16, 96), torch.float32)  # needs no initialisation
    out = matmul_4bit_fused(a, weight, True, workspace=workspace)
    assert rel_err(out, expected) < TOLERANCE[torch.float16]


def run_shuffle_lookup(ptx: str, outputs: int, words: list[int], table: list[float],
                       lane_tables: list[float] | None = None) -> list[list[float]]:
    """The PTX of lookup_word's / lookup_byte's / code_table's GPU path executed for one warp, by PTX's
    own semantics of each instruction it uses (shfl.sync.idx: source lane (lane & ~segmask) |
    (b & ~segmask) within the clamp, segmask = c[12:8]); `table` sits at address 0, 4 bytes an entry,
    and the operand after the words is that address, or each lane's `lane_tables` value. Returns
    lane -> its `outputs` results."""
    regs = [{"%laneid": lane, f"${outputs}": words[lane], f"${outputs + 1}": lane_tables[lane] if lane_tables else 0}
            for lane in range(32)]
    value = lambda r, token: r[token] if token in r else int(token, 0)  # noqa: E731
    for line in ptx.splitlines():
        op, _, rest = line.strip().rstrip(";").partition(" ")
        args = [a.strip() for a in rest.split(",")]
        if op in ("{", "}") or op.startswith(".reg"):
            continue
        if op == "shfl.sync.idx.b32":
            d, a, b, c, mask = args
            assert value({}, mask) & 0xFFFFFFFF == 0xFFFFFFFF, "every lane takes part"
            segmask, clamp = (int(c, 0) >> 8) & 31, int(c, 0) & 31
            sources = []
            for lane, r in enumerate(regs):
                low, high = lane & segmask, (lane & segmask) | (clamp & ~segmask)
                j = low | (value(r, b) & 31 & ~segmask)
                sources.append(regs[j][a] if j <= high else r[a])
            for r, got in zip(regs, sources):
                r[d] = got
            continue
        for r in regs:
            if op == "mov.u32":
                r[args[0]] = value(r, args[1])
            elif op == "and.b32":
                r[args[0]] = value(r, args[1]) & value(r, args[2])
            elif op in ("mul.wide.u32", "add.s64"):
                x, y = value(r, args[1]), value(r, args[2])
                r[args[0]] = x * y if op == "mul.wide.u32" else x + y
            elif op == "shr.u32":
                r[args[0]] = (value(r, args[1]) & 0xFFFFFFFF) >> value(r, args[2])
            elif op == "ld.global.nc.f32":
                r[args[0]] = table[value(r, args[1].strip("[]")) // 4]
            else:
                raise AssertionError(f"no semantics here for {op}")
    return [[r[f"${k}"] for k in range(outputs)] for r in regs]


def test_shuffled_lookups_give_each_nibble_its_code_in_element_order():
    """lookup_word's and lookup_byte's GPU path (PTX the interpreter cannot run), executed by PTX's
    semantics: every lane's outputs are the codes of its nibbles in element order (a byte's high
    nibble first, bitsandbytes' packing), as the interpreter's loads give them."""
    from qlora.kernels.nf4.dequantize import (_CODE_TABLE, _SHUFFLE_BYTE, _SHUFFLE_WORD, _SHUFFLE_WORD_FROM_TABLE,
                                              WORD_SHIFTS)

    g = torch.Generator().manual_seed(0)
    table = torch.randn(16, generator=g).tolist()
    words = torch.randint(-2**31, 2**31, (32,), generator=g, dtype=torch.int64).tolist()
    # The table loaded in the block, or once a program by code_table and handed in.
    lane_tables = [t for (t,) in run_shuffle_lookup(_CODE_TABLE.value, 1, [0] * 32, table)]
    assert lane_tables == [table[lane & 15] for lane in range(32)]
    for got in (run_shuffle_lookup(_SHUFFLE_WORD.value, 8, words, table),
                run_shuffle_lookup(_SHUFFLE_WORD_FROM_TABLE.value, 8, words, table, lane_tables)):
        for lane, word in enumerate(words):
            packed = (word & 0xFFFFFFFF).to_bytes(4, "little")
            nibbles = [n for byte in packed for n in (byte >> 4, byte & 15)]
            assert got[lane] == [table[n] for n in nibbles]
            assert got[lane] == [table[((word & 0xFFFFFFFF) >> s) & 15] for s in WORD_SHIFTS]
    # lookup_byte: a byte (0..255, as the byte decode loads it) to its high then low nibble's code.
    bytes_ = torch.randint(0, 256, (32,), generator=g).tolist()
    got = run_shuffle_lookup(_SHUFFLE_BYTE.value, 2, bytes_, table)
    assert got == [[table[b >> 4], table[b & 15]] for b in bytes_]


@triton.jit
def relabel_tile(source, relabelled, restored, K_WIDTH: tl.constexpr):
    """A [64, 64] tile through mma_k_order and mma_row_order, and back through the inverse."""
    offsets = tl.arange(0, 64)[:, None] * 64 + tl.arange(0, 64)[None, :]
    tile = mma_row_order(mma_k_order(tl.load(source + offsets), 64, K_WIDTH))
    tl.store(relabelled + offsets, tile)
    tl.store(restored + offsets, mma_row_order_inverse(tile))


@interpreter_only
@pytest.mark.parametrize("k_width", (2, 4))
def test_interp_mma_relabelling_is_the_documented_permutation(k_width):
    """mma_k_order and mma_row_order only relabel a decoded [64, 64] tile: each value lands where the
    docstrings say (K: element bits 1, 2 | lanes | bit 4 | a thread's words for kWidth 4; bit 1 |
    lanes | bits 2, 4 | words for kWidth 2; rows 32 apart to 8 apart), and the inverse undoes the rows."""
    source = torch.arange(64 * 64, dtype=torch.int32).reshape(64, 64)
    relabelled, restored = torch.empty_like(source), torch.empty_like(source)
    relabel_tile[(1,)](source, relabelled, restored, K_WIDTH=k_width)

    def column(k):  # the element of the row that logical column k holds
        e1, lane = k & 1, (k >> 1) & 3 if k_width == 2 else (k >> 2) & 3
        e2 = (k >> 3) & 1 if k_width == 2 else (k >> 1) & 1
        e4, thread_word = (k >> 4) & 1, k >> 5
        return 8 * (2 * lane + thread_word) + 4 * e4 + 2 * e2 + e1

    def row(j):  # bits 8, 16, 32 of the relabelled row come from rows' bits 32, 8, 16
        return (j & 7) | ((j >> 3) & 1) << 5 | ((j >> 4) & 1) << 3 | ((j >> 5) & 1) << 4

    expected = torch.tensor([[row(j) * 64 + column(k) for k in range(64)] for j in range(64)], dtype=torch.int32)
    assert torch.equal(relabelled, expected)
    assert sorted({column(k) for k in range(64)}) == list(range(64))
    # The product's rows are restored (the MMA's K order never needs undoing: a sum over K).
    assert torch.equal(restored[:, :], source[:, [column(k) for k in range(64)]])


@interpreter_only
def test_interp_row_tiles_decode_from_a_packed_view_that_starts_mid_word():
    """decode_row_tile reads 32-bit words: a weight whose bytes start 1 byte into a buffer is copied
    to an aligned one first, and decodes as the twin does."""
    from qlora.kernels.nf4.gemv import gemv_4bit
    from qlora.kernels.nf4.matmul import matmul_4bit_fused

    weight = quantized((96, 256))
    buffer = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8)
    buffer[1:].copy_(weight.packed.reshape(-1))
    shifted = weight._replace(packed=buffer[1:].reshape(weight.packed.shape))
    assert shifted.packed.data_ptr() % 4
    a = torch.randn(3, 256, dtype=torch.float32)
    expected = a.double() @ dense(weight, torch.float32).T.double()
    assert rel_err(gemv_4bit(a, shifted), expected) < TOLERANCE[torch.float32]
    assert rel_err(matmul_4bit_fused(a, shifted, True), expected) < TOLERANCE[torch.float32]


@interpreter_only
@pytest.mark.parametrize("path, m", [("auto", 1), ("auto", 37), ("dequant_matmul", 37), ("gemv", 3)])
def test_interp_linear_4bit_autograd(triton_backend, path, m):
    # Through the custom op and the autograd Function; 3-D input, bias, fp16.
    dtype = torch.float16
    weight = quantized((96, 320), "nf4", 64, True)
    w = dense(weight, dtype)
    x = torch.randn(1, m, 320, dtype=dtype, requires_grad=True)
    bias = torch.randn(96, dtype=dtype, requires_grad=True)
    y = linear_4bit(x, weight, bias=bias, path=path)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert y.shape == (1, m, 96) and y.dtype == dtype
    assert rel_err(y, x.double() @ w.T + bias.double()) < TOLERANCE[dtype]
    assert rel_err(x.grad, grad_y.double() @ w) < TOLERANCE[dtype]
    assert torch.allclose(bias.grad.double(), grad_y.double().sum((0, 1)), rtol=1e-2)


@interpreter_only
def test_interp_layer_triton_matches_torch_backend(triton_backend):
    # The 4-bit layer itself, fp32, storage bf16 and no double quant: Triton vs reference backend.
    linear = torch.nn.Linear(320, 96)
    layer = qlora.Linear4bit.from_linear(linear, compute_dtype=torch.float32, double_quant=False,
                                         quant_storage=torch.bfloat16, blocksize=128)
    x = torch.randn(320, 2 * 37).T[::2].unsqueeze(0)  # non-contiguous, 37 rows
    outputs = {}
    for backend in ("triton", "torch"):
        set_backend(backend)
        xb = x.detach().clone().requires_grad_(True)
        y = layer(xb)
        y.backward(torch.ones_like(y))
        outputs[backend] = (y, xb.grad)
    assert rel_err(outputs["triton"][0], outputs["torch"][0]) < 1e-6
    assert rel_err(outputs["triton"][1], outputs["torch"][1]) < 1e-6


@interpreter_only
def test_interp_dequantize_op_dispatches_to_triton(triton_backend, monkeypatch):
    from qlora.kernels.nf4 import dequantize

    calls = []
    original = dequantize.dequantize_4bit_triton
    monkeypatch.setattr(dequantize, "dequantize_4bit_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    weight = quantized((37, 95), "nf4", 64, True)
    out = ops.dequantize_4bit_op(*weight, torch.float32)
    assert calls and torch.equal(out, reference.dequantize_4bit_torch(weight, torch.float32))


@interpreter_only
@pytest.mark.parametrize("path", ("gemv", "fused", "dequant_matmul"))
def test_interp_empty_batch_on_every_path(triton_backend, path):
    # M = 0 (an empty batch after packing): an empty result like the reference, never a crash.
    weight = quantized((96, 320), "nf4", 64, True)
    for transpose_weight, features, cols in ((True, 320, 96), (False, 96, 320)):
        a = torch.randn(0, features, dtype=torch.float16)
        out = ops.matmul(a, weight, None, transpose_weight, path)
        assert out.shape == (0, cols) and out.dtype == torch.float16


@interpreter_only
@pytest.mark.parametrize("path", ("gemv", "fused", "dequant_matmul"))
def test_interp_autocast_gives_the_autocast_dtype_on_every_path(triton_backend, path):
    weight = quantized((96, 320), "nf4", 64, True)
    x = torch.randn(5, 320, requires_grad=True)
    bias = torch.randn(96)
    with torch.autocast("cpu", dtype=torch.float16):
        y = linear_4bit(x, weight, bias=bias, path=path)
    assert y.dtype == torch.float16, path
    expected = x.detach().half().double() @ dense(weight, torch.float16).T + bias.half().double()
    assert rel_err(y, expected) < TOLERANCE[torch.float16]
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


@interpreter_only
@pytest.mark.parametrize("kernel", ("fused", "gemv"))
def test_interp_row_offsets_past_int32(kernel):
    # Three rows 2**30 + 64 elements apart: row 2 starts past element 2**31, where an int32
    # offs_m * stride wraps negative. The buffer is reserved, never touched past these rows, so the
    # OS backs only the pages written here.
    from qlora.kernels.nf4.gemv import gemv_4bit
    from qlora.kernels.nf4.matmul import matmul_4bit_fused

    in_features, stride = 128, 2**30 + 64
    weight = quantized((64, in_features), "nf4", 64, False)
    buffer = torch.empty(2 * stride + in_features, dtype=torch.float16)
    x = buffer.as_strided((3, in_features), (stride, 1))
    rows = torch.randn(3, in_features, dtype=torch.float16)
    for i in range(3):
        buffer[i * stride: i * stride + in_features] = rows[i]
    out = torch.full((3, 64), float("nan"), dtype=torch.float16)
    if kernel == "fused":
        matmul_4bit_fused(x, weight, True, out=out)
    else:
        gemv_4bit(x, weight, True, out=out)
    assert rel_err(out, rows.double() @ dense(weight, torch.float16).T) < TOLERANCE[torch.float16]


@interpreter_only
def test_interp_self_check_catches_a_wrong_kernel_and_falls_back(triton_backend, monkeypatch, caplog):
    import logging
    import warnings

    from qlora.kernels.nf4 import gemv
    from qlora.kernels import selfcheck

    selfcheck.reset()
    original = gemv.gemv_4bit
    # The injected fault: a GEMV 1% off, as a miscompiled kernel on an untested GPU could be.
    monkeypatch.setattr(gemv, "gemv_4bit", lambda a, weight, transpose_weight=True, bias=None, **kw:
                        original(a, weight, transpose_weight, bias, **kw) * 1.01)
    weight = quantized((96, 320), "nf4", 64, True)
    x = torch.randn(3, 320, dtype=torch.float16)
    expected = x.double() @ dense(weight, torch.float16).T
    with caplog.at_level(logging.INFO, logger="qlora.kernels"):
        with pytest.warns(RuntimeWarning, match="Triton gemv kernel gave a wrong result on cpu.*PyTorch reference"):
            y = linear_4bit(x, weight, path="gemv")
        assert rel_err(y, expected) < TOLERANCE[torch.float16]  # the reference's answer, not the faulty one
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: the fallback stays, silently
            assert rel_err(linear_4bit(x, weight, path="gemv"), expected) < TOLERANCE[torch.float16]
        assert selfcheck.passed("fused", torch.device("cpu"), torch.float16)  # other paths are unaffected
    assert "self-check gemv on cpu torch.float16: FAIL in" in caplog.text
    assert "self-check fused on cpu torch.float16: PASS in" in caplog.text
    assert selfcheck.results() == {"gemv on cpu float16": False, "fused on cpu float16": True}
    selfcheck.reset()


@interpreter_only
@pytest.mark.parametrize("path", ("dequantize", "gemv", "fused", "int8_dequantize", "int8_matmul", "gptq_dequantize",
                                  "gptq_fused", "gptq_gemv", "adamw8bit"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_interp_self_checks_pass_on_the_real_kernels(path, dtype):
    from qlora import doctor
    from qlora.kernels import selfcheck
    from qlora.kernels.moe import selfcheck as _moe_checks  # noqa: F401  (as doctor.run_checks imports it)

    # qlora doctor runs every registered check: the GPU paths, and the CPU paths' own report.
    assert set(doctor.PATHS) | set(doctor.CPU_CHECKS) == set(selfcheck.CHECKS)

    ok, detail = selfcheck.CHECKS[path](torch.device("cpu"), dtype)
    assert ok, detail


# ---- CPU: dispatch, errors, torch.compile ---------------------------------------------------------
def test_dispatch_rule_follows_the_model_table():
    from qlora.kernels.nf4.dispatch_table import PATHS

    assert set(PATHS) >= {80, 86, 89, 90}
    for arch, directions in PATHS.items():
        for direction, transpose_weight in (("forward", True), ("backward", False)):
            assert directions[direction]
            for (out_features, in_features, blocksize), buckets in directions[direction].items():
                shape = (out_features, in_features)
                cols = out_features if transpose_weight else in_features
                assert [m for m, _ in buckets] == sorted(m for m, _ in buckets)
                for largest, path in buckets:
                    assert ops.choose_path(largest, torch.bfloat16, arch, transpose_weight, cols, shape, blocksize) == path
                assert ops.choose_path(10**6, torch.bfloat16, arch, transpose_weight, cols, shape, blocksize) == buckets[-1][1]
                for m in (1, 17, 300, 5000):  # fp32 never takes the fused path; the GEMV stops at 64 rows
                    assert ops.choose_path(m, torch.float32, arch, transpose_weight, cols, shape, blocksize) != "fused"
                    assert m <= 64 or ops.choose_path(m, torch.bfloat16, arch, transpose_weight, cols, shape, blocksize) != "gemv"
    newest = PATHS[max(PATHS)]["forward"]
    assert ops.path_table(120, shape=(14336, 4096)) == newest[(14336, 4096, 64)]  # a newer GPU: the newest arch modelled
    # A weight the model never saw takes the nearest modelled shape's buckets, then the nearest blocksize.
    assert ops.path_table(90, shape=(12288, 4096), blocksize=64) == PATHS[90]["forward"][(14336, 4096, 64)]
    assert ops.path_table(90, shape=(1024, 4096), blocksize=32) == PATHS[90]["forward"][(1024, 4096, 64)]
    assert ops.path_table(90, False, shape=(4096, 11008), blocksize=4096) == PATHS[90]["backward"][(4096, 14336, 4096)]


def test_committed_model_results_agree_with_the_dispatch_table():
    # benchmarks/results/kernels-static.json and kernels/nf4/dispatch_table.py come from one run of
    # benchmarks/kernels_static.py: every dispatch row's path is what choose_path picks now, it is
    # within 5% of the fastest path the model knows, and the goals block is read from those rows.
    import json
    from pathlib import Path

    result = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "kernels-static.json").read_text())
    rows = result["dispatch"]
    assert {row["arch"] for row in rows} == {80, 86, 89, 90}
    for row in rows:
        chosen = ops.choose_path(row["M"], torch.bfloat16, row["arch"], row["transpose_weight"],
                                 row["N"] if row["transpose_weight"] else row["K"], (row["N"], row["K"]), row["blocksize"])
        assert row["path"] == chosen and row["estimate_us"] == row["estimates"][chosen], row
        assert row["best_estimate_us"] == min(row["estimates"].values())
        assert row["estimate_us"] <= 1.05 * row["best_estimate_us"], row
    goals = result["goals_sm90_gate_proj_bs64_forward"]
    gate = {row["M"]: row for row in rows if row["arch"] == 90 and row["shape"] == "gate_proj" and row["blocksize"] == 64
            and row["transpose_weight"]}
    assert goals["decode_speedup_M1"] == round(gate[1]["bf16_estimate_us"] / gate[1]["estimate_us"], 3)
    assert goals["worst_M2_16_bf16_over_dispatched"] == round(
        min(gate[m]["bf16_estimate_us"] / gate[m]["estimate_us"] for m in (2, 4, 8, 16)), 3)
    assert goals["dispatch_worst_ratio_to_fastest"] == round(max(r["estimate_us"] / r["best_estimate_us"] for r in gate.values()), 3)
    assert goals["dispatch_worst_ratio_to_fastest_whole_sweep"] <= 1.05


def test_autocast_rule_in_eager_and_compiled(monkeypatch):
    # The reference path and the fake implementation (what torch.compile traces) give the same dtype.
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    weight = quantized((48, 64))
    x = torch.randn(3, 64)
    eager = lambda x: linear_4bit(x, weight, bias=torch.zeros(48))  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(eager, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert eager(x).dtype == compiled(x).dtype == torch.bfloat16
        assert ops.matmul_4bit_op(x, *weight, None, True, "auto").dtype == torch.float32  # the op itself: a's dtype
    assert eager(x).dtype == compiled(x).dtype == torch.float32


@pytest.mark.skipif(INTERPRETED, reason="checks the guard outside the interpreter")
def test_interpreted_as_needs_the_interpreter():
    # Choosing sm_80's tiles for launches that then run compiled on this machine's GPU (or fail on its
    # CPU) would test nothing: the block refuses to open outside TRITON_INTERPRET=1.
    from qlora.kernels.launch import interpreted_as

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is not set"):
        with interpreted_as(80):
            pass


def test_empty_batch_reference():
    weight = quantized((48, 64))
    assert linear_4bit(torch.randn(0, 64), weight).shape == (0, 48)


def test_tf32_flag_read_through_the_new_api():
    from qlora.kernels.nf4.matmul import input_precision

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # after this, reading the legacy allow_tf32 raises on torch 2.13
        assert input_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert input_precision(torch.float32) == "ieee"
        assert input_precision(torch.bfloat16) == "tf32"  # 16-bit operands: Triton's default
    finally:
        matmul.fp32_precision = before


def test_launch_runs_under_the_tensors_device(monkeypatch):
    # Triton launches on torch's current device; a tensor on cuda:1 must switch to it for the launch.
    from qlora.kernels import launch

    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: entered.append(("launched", grid))

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(launch, "launch_device", lambda args: torch.device("cuda", 1))
    launch.launch(Kernel(), (4,), torch.empty(1))
    assert entered == [torch.device("cuda", 1), ("launched", (4,)), "exit"]
    monkeypatch.undo()
    entered.clear()
    launch.launch(Kernel(), (4,), 3, torch.empty(1))  # CPU tensors: no CUDA guard
    assert entered == [("launched", (4,))]
    assert launch.launch_device((3, torch.empty(1, device="meta"))) == torch.device("meta")


def test_self_check_can_be_switched_off(monkeypatch):
    from qlora.kernels import selfcheck

    selfcheck.reset()
    monkeypatch.setenv("QLORA_SELF_CHECK", "0")
    monkeypatch.setitem(selfcheck.CHECKS, "gemv", lambda device, dtype: pytest.fail("ran a check"))
    assert selfcheck.passed("gemv", torch.device("cpu"), torch.float16) and selfcheck.results() == {}


def test_backend_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("QLORA_BACKEND", raising=False)
    assert backend.get_backend() == "auto"
    assert not use_triton(cpu)  # auto: the reference on CPU
    monkeypatch.setattr(backend, "compute_capability", lambda device: (9, 0))
    assert use_triton(torch.device("cuda"))  # auto: Triton on an H100
    monkeypatch.setattr(backend, "compute_capability", lambda device: (7, 5))
    assert not use_triton(torch.device("cuda"))  # auto: the reference on a T4
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    assert not use_triton(torch.device("cuda"))
    monkeypatch.setenv("QLORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="QLORA_BACKEND must be one of auto, torch, triton, cpu, got 'cuda'"):
        use_triton(cpu)
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors.*TRITON_INTERPRET=1"):
        use_triton(cpu)
    set_backend("torch")
    try:
        assert not use_triton(cpu)  # the setter wins over the environment
    finally:
        set_backend(None)
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend("gpu")


def test_input_errors(monkeypatch):
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    weight = quantized((32, 64))
    x = torch.randn(3, 64)
    with pytest.raises(TypeError, match="input must be float32, float16 or bfloat16, got torch.int64"):
        linear_4bit(torch.ones(3, 64, dtype=torch.long), weight)
    with pytest.raises(ValueError, match="input has 63 features"):
        linear_4bit(torch.randn(3, 63), weight)
    with pytest.raises(ValueError, match=r"packed weight has 1024 bytes, shape \[32, 65\] needs 1040"):
        linear_4bit(torch.randn(3, 65), weight._replace(shape=(32, 65)))
    with pytest.raises(ValueError, match="blocksize must be a power of two in \\[32, 4096\\], got 48"):
        linear_4bit(x, weight._replace(blocksize=48))
    with pytest.raises(TypeError, match="with double quantization absmax holds uint8 codes, got torch.float32"):
        linear_4bit(x, weight._replace(absmax=weight.absmax.float()))
    with pytest.raises(ValueError, match="nested_absmax, nested_code and offset together"):
        linear_4bit(x, weight._replace(offset=None))
    with pytest.raises(TypeError, match="storage must be one of uint8.*got torch.int32"):
        linear_4bit(x, weight._replace(packed=weight.packed.reshape(-1).view(torch.int32)))
    with pytest.raises(ValueError, match=r"bias has shape \[31\]"):
        linear_4bit(x, weight, bias=torch.randn(31))
    with pytest.raises(ValueError, match="path='fused' is a Triton kernel, but the backend here is the PyTorch reference"):
        linear_4bit(x, weight, path="fused")
    with pytest.raises(ValueError, match="path must be one of"):
        linear_4bit(x, weight, path="cublas")


def test_custom_ops_pass_opcheck():
    weight = quantized((37, 95), "nf4", 64, True)
    torch.library.opcheck(ops.dequantize_4bit_op, (*weight[:-1], [37, 95], torch.float16))
    x = torch.randn(5, 95)
    torch.library.opcheck(ops.matmul_4bit_op, (x, *weight[:-1], [37, 95], torch.randn(37), True, "auto"))
    torch.library.opcheck(ops.matmul_4bit_op, (torch.randn(5, 37), *weight[:-1], [37, 95], None, False, "auto"))


def test_compile_fullgraph_forward_and_backward(monkeypatch):
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    torch._dynamo.reset()
    layer = qlora.Linear4bit.from_linear(torch.nn.Linear(64, 48), compute_dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 7, 64, requires_grad=True)
    y = compiled(x)
    y.backward(torch.ones_like(y))
    x_eager = x.detach().clone().requires_grad_(True)
    y_eager = layer(x_eager)
    y_eager.backward(torch.ones_like(y_eager))
    assert torch.allclose(y, y_eager, atol=1e-6) and torch.allclose(x.grad, x_eager.grad, atol=1e-6)


# ---- GPU: real sizes, bf16/fp16 -------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_gpu_dequantize_bit_exact(dtype, quant_type, double_quant):
    from qlora.kernels.nf4.dequantize import dequantize_4bit_triton

    shape = (4097, 4095)  # odd numel
    weight = quantized(shape, quant_type, 64, double_quant, device="cuda")
    out = dequantize_4bit_triton(weight, dtype, out=nan_like(shape, dtype, "cuda"))
    assert torch.equal(out, reference.dequantize_4bit_torch(weight, dtype))


@requires_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("path, m", [("gemv", 1), ("gemv", 16), ("fused", 64), ("fused", 1000), ("dequant_matmul", 2048)])
def test_gpu_linear_4bit_paths(dtype, path, m):
    set_backend("triton")
    try:
        weight = quantized((4096, 4104), "nf4", 64, True, device="cuda")
        w = dense(weight, dtype).float()
        x = torch.randn(m, 4104, dtype=dtype, device="cuda", requires_grad=True)
        y = linear_4bit(x, weight, path=path)
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
        assert rel_err(y, x.float() @ w.T) < TOLERANCE[dtype]
        assert rel_err(x.grad, grad_y.float() @ w) < TOLERANCE[dtype]
    finally:
        set_backend(None)


@requires_cuda
def test_gpu_gemv_cuda_graph_replay():
    from qlora.kernels.nf4.gemv import gemv_4bit, gemv_workspace_shape

    weight = quantized((4096, 4096), "nf4", 64, True, device="cuda")
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
    workspace = torch.empty(gemv_workspace_shape(1, (4096, 4096), 64, True, x.device), device="cuda")
    gemv_4bit(x, weight, out=out, workspace=workspace)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv_4bit(x, weight, out=out, workspace=workspace)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    w = dense(weight, torch.bfloat16).float()
    assert rel_err(out, x.float() @ w.T) < TOLERANCE[torch.bfloat16]


@requires_cuda
def test_gpu_compile_inductor_no_graph_break():
    torch._dynamo.reset()
    layer = qlora.Linear4bit.from_linear(torch.nn.Linear(4096, 4096, device="cuda"), compute_dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(8, 512, 4096, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    y = compiled(x)
    y.backward(torch.ones_like(y))
    assert rel_err(y, layer(x)) < 1e-3
