"""Every Triton kernel, launched by its real launcher, compiles for an A100 (sm_80), an L4 or RTX
4090 (sm_89) and an H100/H200 (sm_90) without a GPU, and the machine code is launchable there and
on the fast path.

The interpreter tests (test_kernels.py, test_optim_kernels.py) check what the kernels compute;
these check what only a GPU compiler sees: bf16 lowering, tl.dot operand layouts, register
spills into local memory, shared memory past the per-block limit, and a tl.dot that missed the
tensor cores. Compilation uses the ptxas shipped in the triton wheel (qlora.kernels.launch).
"""
import pytest
import torch

import qlora
from qlora.kernels import launch
from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK, TENSOR_CORE_MMAS, machine_code
from qlora.kernels.nf4.matmul import FUSED_SPLIT_PROGRAMS_PER_SM_REGISTER_A

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(triton.knobs.runtime.interpret, reason="compiles for a GPU: not under TRITON_INTERPRET=1")

ARCHS = (80, 89, 90)  # A100; L4, RTX 4090 (99 KB shared memory per block); H100/H200
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quantized(shape, double_quant=True):
    packed, state = qlora.quantize_4bit(torch.randn(shape) * 0.05, "nf4", 64, double_quant)
    return state.packed_view(packed)


def compile_4bit_launches(arch, dtype, double_quant=True):
    """Compile each launcher at the M values that select each of its block configurations."""
    from qlora.kernels.nf4.dequantize import dequantize_4bit_triton
    from qlora.kernels.nf4.gemv import gemv_4bit
    from qlora.kernels.nf4.matmul import matmul_4bit_fused

    out_features, in_features = 96, 320
    weight = quantized((out_features, in_features), double_quant)
    bias = torch.randn(out_features, dtype=dtype)
    with launch.compile_only(arch) as compiled:
        dequantize_4bit_triton(weight, dtype)
        for m in (16, 32, 37, 48):  # BLOCK_M 16, 32, 64; and 64 at a multiple of 16 (Triton specialises on it)
            matmul_4bit_fused(torch.randn(m, in_features, dtype=dtype), weight, transpose_weight=True, bias=bias)
        matmul_4bit_fused(torch.randn(37, out_features, dtype=dtype), weight, transpose_weight=False)
        for m in (1, 4, 37):  # BLOCK_M 1 (decode), 4, and 16 (rows spread over three programs)
            gemv_4bit(torch.randn(m, in_features, dtype=dtype), weight, transpose_weight=True, bias=bias)
    return compiled


def store_bytes(mnemonic: str) -> int:
    """Bytes a lane stores with an STS (STS.64: 8; STS: 4)."""
    widths = [int(part) for part in mnemonic.split(".")[1:] if part.isdigit()]
    return widths[0] // 8 if widths else 4


def check_launchable(launched, arch):
    code = machine_code(launched.kernel, arch)
    where = f"{launched.name} {launched.constexprs} on sm_{arch}"
    assert code.local_bytes == 0, f"{where} spills {code.local_bytes} bytes/thread to local memory ({code.registers} registers)"
    assert code.shared_bytes <= MAX_SHARED_PER_BLOCK[arch], f"{where} needs {code.shared_bytes} bytes of shared memory"
    assert code.blocks_per_sm >= 1, f"{where} does not fit on an SM: {code}"
    return code


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_4bit_kernels_compile_without_spills(arch, dtype):
    compiled = compile_4bit_launches(arch, dtype)
    names = [launched.name for launched in compiled]
    assert names.count("_dequantize_4bit_kernel") == 1
    assert names.count("_matmul_4bit_kernel") == 5
    assert names.count("_gemv_4bit_kernel") == 3 and "_gemv_reduce_kernel" not in names  # one launch per product
    register_a = 0
    for launched in compiled:
        code = check_launchable(launched, arch)
        # Every path decodes W to the same bits: no kernel may contract the double-quant scale
        # code * absmax + offset into an FMA (the dequantize kernel rounds twice, as the reference).
        assert launched.kernel.metadata.enable_fp_fusion is False, launched.name
        if launched.name == "_matmul_4bit_kernel" and dtype != torch.float32:
            # The fused kernel exists to keep the product on the tensor cores while it decodes W.
            assert code.count(TENSOR_CORE_MMAS) > 0, f"{launched.constexprs}: no tensor-core MMA in {code.opcodes}"
            constexprs = launched.constexprs
            if constexprs["BLOCK_M"] == 16 and constexprs["TRANSPOSED"] and constexprs["REGISTER_A"]:
                # The decoded W tile is the MMA's A operand where it was decoded: the loop stores
                # only the input's 16 rows to shared memory, never W's tile.
                stored = sum(32 * store_bytes(mnemonic) for mnemonic, _ in code.loop_lines if mnemonic.startswith("STS"))
                assert stored <= 16 * constexprs["BLOCK_R"] * dtype.itemsize // code.num_warps, (constexprs, stored)
                register_a += 1
                # fused_split aims at 6 programs an SM for this tile on sm_80/90: they must fit at once.
                assert code.blocks_per_sm >= FUSED_SPLIT_PROGRAMS_PER_SM_REGISTER_A, (constexprs, code.registers)
    assert register_a == (dtype.itemsize == 2)  # the 16-row forward, in 16 bits


# The configurations that overflowed shared memory or spilled before tiles followed the arch's
# limits: blocksize 256 row tiles (64 x 256 decoded, 255 registers), per-element decode at 3
# stages (120 KB on sm_86/89), both products, every tl.dot M bucket. The full grid (blocksize
# 32..4096 x decode x M bucket x arch) is compiled by benchmarks/kernels_static.py.
LIMIT_CASES = [
    # (blocksize, in_features): in % blocksize == 0 decodes row tiles (up to blocksize 256), else per element
    (256, 512), (512, 1024),
]


@pytest.mark.parametrize("arch", (80, 86, 90))
@pytest.mark.parametrize("blocksize, in_features", LIMIT_CASES)
def test_tiles_follow_the_arch_limits(arch, blocksize, in_features):
    from qlora.kernels.nf4.gemv import gemv_4bit
    from qlora.kernels.nf4.matmul import matmul_4bit_fused

    packed, state = qlora.quantize_4bit(torch.randn(64, in_features) * 0.05, "nf4", blocksize, True)
    weight = state.packed_view(packed)
    with launch.compile_only(arch) as compiled:
        for m in (16, 64):
            for transpose_weight, features in ((True, in_features), (False, 64)):
                matmul_4bit_fused(torch.randn(m, features, dtype=torch.bfloat16), weight, transpose_weight)
        for transpose_weight, features in ((True, in_features), (False, 64)):
            gemv_4bit(torch.randn(16, features, dtype=torch.bfloat16), weight, transpose_weight)
    for launched in compiled:
        check_launchable(launched, arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype, double_quant", ((torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)),
                         ids=str)
def test_fused_split_k_compiles_without_spills(arch, dtype, double_quant):
    # The split-K epilogue (partial sums, arrival counter, the last split's ordered sum) on top of
    # the decode tile: 16-row tiles at 1 stage (decode) and 64-row tiles, both products, with and
    # without double quant (the pair decode and the two 4-byte gathers), and fp32's CUDA-core tiles.
    # The launchability sweep (benchmarks/kernels_static.py) covers every blocksize with double quant.
    from qlora.kernels.nf4.matmul import fused_programs_per_sm, matmul_4bit_fused

    weight = quantized((256, 512), double_quant)
    with launch.compile_only(arch) as compiled:
        for m in (16, 64):
            for transpose_weight, features in ((True, 512), (False, 256)):
                matmul_4bit_fused(torch.randn(m, features, dtype=dtype), weight, transpose_weight, split_k=2)
    # Without double quant 64-row tiles do not split (fused_may_split); fp32 tiles are 16 rows.
    assert [launched.constexprs["DIRECT_STORE"] for launched in compiled] == [False] * 2 + [not double_quant] * 2
    for launched in compiled:
        if not launched.constexprs["DIRECT_STORE"]:  # the one-split code is checked above and by the sweeps
            code = check_launchable(launched, arch)
            c = launched.constexprs
            if c["BLOCK_M"] == 16 and dtype != torch.float32:  # as many split programs fit an SM as fused_split puts there
                per_sm = fused_programs_per_sm(c, c, arch)
                assert code.blocks_per_sm >= per_sm, (c, code.registers, code.blocks_per_sm)


@pytest.mark.parametrize("arch", (80, 86, 89))
def test_m1_decode_takes_the_input_from_registers(arch):
    # At M = 1 on mma.sync the input's rows are the MMA's B operand as loaded (REGISTER_B): the decode
    # loop touches no shared memory, split or not, within the registers fused_max_registers caps it
    # at, so the programs the split cost counts fit an SM, and without spilling.
    from qlora.kernels.nf4.matmul import fused_programs_per_sm, matmul_4bit_fused

    weight = quantized((256, 512))
    with launch.compile_only(arch) as compiled:
        for split_k in (1, 2):
            matmul_4bit_fused(torch.randn(1, 512, dtype=torch.bfloat16), weight, True, split_k=split_k)
    assert [launched.constexprs["DIRECT_STORE"] for launched in compiled] == [True, False]
    for launched in compiled:
        c = launched.constexprs
        assert c["REGISTER_B"] and c["ROWS"] == 8, c
        code = check_launchable(launched, arch)
        shared = [mnemonic for mnemonic, _ in code.loop_lines if mnemonic.split(".")[0] in ("STS", "LDS", "LDSM", "BAR")]
        assert not shared, (c, shared)
        assert code.registers <= launched.kernel.metadata.maxnreg, (c, code.registers)
        assert code.blocks_per_sm >= fused_programs_per_sm(c, c, arch), (c, code.registers)


@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_kernels_compile_without_double_quant(arch):
    for launched in compile_4bit_launches(arch, torch.bfloat16, double_quant=False):
        check_launchable(launched, arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("grad_dtype", (torch.float32, torch.bfloat16), ids=str)
def test_adamw8bit_kernel_compiles_without_spills(arch, grad_dtype):
    from qlora.kernels.optim import AdamW8bitHyper, AdamW8bitTensors
    from qlora.kernels.optim.adamw8bit import adamw8bit_update_triton
    from qlora.quant.nf4.codes import dynamic_map

    numel, blocksize = 4113, 256
    blocks = -(-numel // blocksize)
    param = torch.randn(numel)
    with launch.compile_only(arch) as compiled:
        adamw8bit_update_triton(
            AdamW8bitTensors(param, torch.randn(numel, dtype=grad_dtype), torch.zeros(numel, dtype=torch.uint8),
                             torch.ones(blocks), torch.zeros(numel, dtype=torch.uint8), torch.ones(blocks),
                             dynamic_map("cpu", signed=True), dynamic_map("cpu", signed=False)),
            AdamW8bitHyper(step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, blocksize=blocksize))
    assert [launched.name for launched in compiled] == ["_adamw8bit_kernel"]
    check_launchable(compiled[0], arch)


def test_compile_only_runs_nothing_and_restores_the_driver():
    from qlora.kernels.nf4.dequantize import dequantize_4bit_triton

    weight = quantized((8, 64))
    out = torch.full((8, 64), 7.0)
    with launch.compile_only(90) as compiled:
        dequantize_4bit_triton(weight, torch.float32, out=out)
        with pytest.raises(RuntimeError, match="do not nest"):
            with launch.compile_only(80):
                pass
    assert len(compiled) == 1 and torch.all(out == 7.0)  # compiled, never ran
    assert compiled[0].kernel.asm["cubin"][:4] == b"\x7fELF"
    if not torch.cuda.is_available():  # the driver was put back: a real launch finds no GPU, as before
        with pytest.raises(RuntimeError):
            triton.runtime.driver.active.get_current_target()


def test_committed_sweeps_are_launchable():
    # The model's sweep (every Llama shape, blocksize 64..4096, every M bucket, both directions) and
    # the launchability sweep (blocksize 32..4096, whole-block and per-element decode, every M bucket
    # of each kernel, both directions) as benchmarks/kernels_static.py compiled them for the four
    # architectures: no spill, shared memory within the limit, at least one block per SM.
    import json
    from pathlib import Path

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    rows = json.loads((results / "kernels-static.json").read_text())["kernels"]
    launches = json.loads((results / "kernels-launchability.json").read_text())["launches"]
    assert {row["arch"] for row in rows} == {row["arch"] for row in launches} == {80, 86, 89, 90}
    assert {64, 128, 256, 4096} <= {row["blocksize"] for row in rows}
    covered = {(row["arch"], row["kernel"], row["blocksize"], row["decode"], row["transpose_weight"], row["M"])
               for row in launches}
    for arch in (80, 86, 89, 90):
        for blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            assert (arch, "dequantize", blocksize, "flat", True, 1) in covered
            for decode in ("whole_block", "per_element"):
                for transpose_weight in (True, False):
                    for kernel, buckets in (("gemv", (1, 2, 4, 8, 16)), ("fused", (8, 16, 32, 64)),
                                            ("fused_split", (8, 16, 32, 64))):
                        for m in buckets:
                            assert (arch, kernel, blocksize, decode, transpose_weight, m) in covered
    bad = sorted({(row["arch"], row["kernel"], row["blocksize"], row.get("decode", ""), row["transpose_weight"], row["M"],
                   row["local_bytes"], row["shared_bytes"], row["blocks_per_sm"]) for row in rows + launches
                  if row["local_bytes"] or row["shared_bytes"] > row["shared_limit"] or row["blocks_per_sm"] < 1})
    assert not bad, bad
    # Split-K never puts more decode-sized programs on an SM than fit at once where its rule says so:
    # the tile decoded into the MMA's A operand, and the other 64 x 64 tiles of whole blocks.
    from qlora.kernels.nf4.matmul import fused_programs_per_sm

    checked, crowded = 0, []
    for row in launches:
        c = row.get("constexprs", {})
        if row["kernel"].startswith("fused") and c["BLOCK_M"] == 16 and c["WHOLE_BLOCKS"] and c["BLOCK_N"] * c["BLOCK_R"] <= 4096:
            checked += 1
            if row["blocks_per_sm"] < fused_programs_per_sm(c, c, row["arch"]):
                crowded.append((row["arch"], row["kernel"], row["blocksize"], row["transpose_weight"], row["M"],
                                row["registers"], row["blocks_per_sm"]))
    assert checked >= 4 * 2 * 2 * 2 and not crowded, crowded


def test_dequantize_bounds_and_indices_are_int64_near_2_31(monkeypatch):
    # A weight of up to 2**31 - 1 elements is accepted (checks.MAX_TRITON_NUMEL). At that size the
    # kernel's bounds computed in int32 wrap: (numel + BLOCKSIZE - 1) // BLOCKSIZE is negative for
    # numel > 2**31 - BLOCKSIZE, every `block < num_blocks` is false and the whole output decodes with
    # scale 0. So the launcher computes the bounds in Python and the kernel compares them, and every
    # index into packed, absmax and the output, as int64. Launched (compiled only) at numel =
    # 2**31 - 1: the tensors are allocated but never touched, so no memory is used.
    import re

    from qlora.kernels.nf4 import dequantize
    from qlora.kernels.nf4.checks import MAX_TRITON_NUMEL
    from qlora.kernels.nf4.packed import Packed4bit
    from qlora.quant.nf4.codes import get_4bit_code

    numel, blocksize = MAX_TRITON_NUMEL, 4096
    blocks = triton.cdiv(numel, blocksize)
    weight = Packed4bit(torch.empty((numel + 1) // 2, dtype=torch.uint8), torch.ones(blocks), get_4bit_code("nf4"),
                        None, None, None, blocksize, 256, (1, numel))
    assert numel + blocksize - 1 > 2**31 - 1  # what wrapped in int32
    launched = []
    real_launch = dequantize.launch
    monkeypatch.setattr(dequantize, "launch", lambda kernel, grid, *args, **kwargs: (
        launched.append((grid, args)), real_launch(kernel, grid, *args, **kwargs))[1])
    with launch.compile_only(90) as compiled:
        dequantize.dequantize_4bit_triton(weight, torch.bfloat16)
    (grid,), args = launched[0]
    bound = dict(zip([p.name for p in dequantize._dequantize_4bit_kernel.params], args))
    assert (bound["numel"], bound["packed_bytes"], bound["num_blocks"]) == (numel, 2**30, blocks)
    elements = dequantize.dequantize_elements(blocksize)
    assert (grid - 1) * elements < numel <= grid * elements  # the last program holds the last element
    ttir = compiled[0].kernel.asm["ttir"]
    assert re.search(r"(%\w+) = tt\.get_program_id x : i32.*\n.*= arith\.extsi \1 : i32 to i64", ttir), "program id not widened to int64"
    for pointer in ("packed_ptr", "absmax_ptr", "out_ptr"):
        # the pointer itself (a scalar offset) or its splat over a tile (a tensor of offsets)
        bases = [f"%{pointer}"] + re.findall(rf"(%\w+) = tt\.splat %{pointer} : ", ttir)
        offsets = [bits for base in bases
                   for bits in re.findall(rf"= tt\.addptr {base}, %\w+ : [^,]+, (?:tensor<[0-9x]+)?(i\d+)", ttir)]
        assert offsets and set(offsets) == {"i64"}, (pointer, offsets)
    for name in ("numel", "packed_bytes", "num_blocks"):  # compared as int64, after widening
        assert re.search(rf"= arith\.extsi %{name} : i\d+ to i64|%{name}: i64", ttir), name
