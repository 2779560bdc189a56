"""The GPTQ Triton kernels against their PyTorch twins (gptq_reference.py), in the interpreter
(fp16/fp32: the interpreter has no bf16 arithmetic), and compiled for sm_80/89/90.

As in test_kernels.py, the interpreter is chosen when a kernel is decorated, so the `interp_`
tests run in a child pytest with TRITON_INTERPRET=1 started by `test_gptq_kernels_in_interpreter`.
"""
import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import qlora
from qlora.kernels.gptq.reference import dequantize_gptq_torch, matmul_gptq_torch
from qlora.quant.gptq.solver import gptq_quantize
from helpers import rel_err, run_interpreter_child

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child")


def weight(bits, out_features, in_features, group_size, act_order, sym=True):
    w = torch.randn(out_features, in_features)
    if not act_order:
        return qlora.GPTQWeight.quantize(w, bits=bits, group_size=group_size, sym=sym).kernel_view()
    x = torch.randn(64, in_features) * torch.linspace(0.1, 2, in_features)
    return gptq_quantize(w, 2 * x.T @ x / 64, bits=bits, group_size=group_size, sym=sym, desc_act=True).weight.kernel_view()


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run itself")
def test_gptq_kernels_in_interpreter():
    run_interpreter_child(__file__)


CASES = [  # bits, out, in, group_size, act_order, sym
    (2, 40, 96, 32, False, True), (3, 48, 96, 32, True, False), (3, 64, 160, -1, False, True),
    (4, 37, 96, 32, True, True), (4, 64, 128, 64, False, False), (8, 24, 64, 16, True, False),
]


@interpreter_only
@pytest.mark.parametrize("bits, n, k, group_size, act_order, sym", CASES)
def test_interp_dequantize_is_bit_exact(bits, n, k, group_size, act_order, sym):
    from qlora.kernels.gptq.triton import dequantize_gptq_triton

    packed = weight(bits, n, k, group_size, act_order, sym)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(dequantize_gptq_triton(packed, dtype), dequantize_gptq_torch(packed, dtype))


@interpreter_only
@pytest.mark.parametrize("bits, n, k, group_size, act_order, sym", CASES)
@pytest.mark.parametrize("m", [0, 1, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_fused_forward_and_backward(bits, n, k, group_size, act_order, sym, m, dtype):
    from qlora.kernels.gptq.triton import matmul_gptq_backward, matmul_gptq_forward

    packed = weight(bits, n, k, group_size, act_order, sym)
    x, grad, bias = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype), torch.randn(n, dtype=dtype)
    # fp32 accumulation of products of dtype-rounded operands: error ~ eps(dtype) * sqrt(K)
    tolerance = 4 * torch.finfo(dtype).eps * max(k, n) ** 0.5
    forward, expected = matmul_gptq_forward(x, packed, bias), matmul_gptq_torch(x.float(), packed, bias.float(), True)
    backward, expected_grad = matmul_gptq_backward(grad, packed), matmul_gptq_torch(grad.float(), packed, None, False)
    assert forward.shape == (m, n) and backward.shape == (m, k)
    if m:
        assert rel_err(forward, expected) < tolerance and rel_err(backward, expected_grad) < tolerance


GEMV_CASES = [  # bits, out, in, group_size, act_order: group 20 puts tiles across groups (the per-value loop)
    (4, 37, 96, 32, True), (2, 40, 96, 32, False), (8, 24, 64, 16, True), (4, 40, 100, 20, False),
]


@interpreter_only
@pytest.mark.parametrize("bits, n, k, group_size, act_order", GEMV_CASES)
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_gemv_matches_the_twin(bits, n, k, group_size, act_order, m, dtype):
    from qlora.kernels.gptq.triton import gemv_gptq

    packed = weight(bits, n, k, group_size, act_order, sym=False)
    x, bias = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype)
    got, expected = gemv_gptq(x, packed, bias), matmul_gptq_torch(x.float(), packed, bias.float(), True)
    # W exact in fp32 (the twin rounds it to dtype first, 2^-11 in fp16), sums in fp32, one final
    # rounding to dtype: eps(dtype) x sqrt(K) bounds the difference
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel_err(got, expected) < 4 * torch.finfo(dtype).eps * k ** 0.5


@interpreter_only
def test_interp_the_layer_runs_the_kernels_through_the_op():
    from qlora.kernels import set_backend

    layer = qlora.LinearGPTQ.from_linear(torch.nn.Linear(96, 40), compute_dtype=torch.float32, bits=3, group_size=32)
    x = torch.randn(3, 96, requires_grad=True)
    expected = layer(x)
    expected.sum().backward()
    expected_grad, x.grad = x.grad, None
    set_backend("triton")
    try:
        got = layer(x)
        got.sum().backward()
    finally:
        set_backend(None)
    assert rel_err(got, expected) < 1e-6 and rel_err(x.grad, expected_grad) < 1e-6


triton = pytest.importorskip("triton")


@pytest.mark.skipif(INTERPRETED, reason="compiles for a GPU: not under TRITON_INTERPRET=1")
@pytest.mark.parametrize("arch", [80, 89, 90])
def test_gptq_kernels_compile_for_each_architecture(arch):
    from qlora.kernels import launch
    from qlora.kernels.gptq.triton import dequantize_gptq_triton, matmul_gptq_backward, matmul_gptq_forward
    from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK, TENSOR_CORE_MMAS, machine_code

    from qlora.kernels.gptq.triton import GEMV_BITS, gemv_gptq

    with launch.compile_only(arch) as compiled:
        # Every width on sm_90; on sm_80/89 the straddling 3-bit decode and 4-bit act-order (compile time is CI time).
        for bits in (2, 3, 4, 8) if arch == 90 else (3, 4):
            packed = weight(bits, 64, 128, 32, act_order=bits == 4)
            dtype = torch.bfloat16  # the training dtype (fp16 lowers the same way; the interpreter covers its values)
            dequantize_gptq_triton(packed, dtype)
            for m in (1, 64):  # BLOCK_M 16 and 64
                matmul_gptq_forward(torch.randn(m, 128, dtype=dtype), packed, torch.randn(64, dtype=dtype))
                matmul_gptq_backward(torch.randn(m, 64, dtype=dtype), packed)
            if bits in GEMV_BITS:  # the decode GEMV and its reduction
                gemv_gptq(torch.randn(1, 128, dtype=dtype), packed, torch.randn(64, dtype=dtype))
    names = [launched.name for launched in compiled]
    assert names.count("_gemv_kernel") == names.count("_reduce_kernel") == (3 if arch == 90 else 1)
    assert len(names) == (4 if arch == 90 else 2) * 5 + 2 * names.count("_gemv_kernel")
    for launched in compiled:
        code = machine_code(launched.kernel, arch)
        assert code.local_bytes == 0, (launched.name, launched.constexprs)  # no register spills
        assert code.shared_bytes <= MAX_SHARED_PER_BLOCK[arch] and code.blocks_per_sm >= 1
        if launched.name in ("_forward_kernel", "_backward_kernel"):  # the products run on the tensor cores
            assert code.count(TENSOR_CORE_MMAS) > 0, (launched.name, launched.constexprs)


RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "gptq-kernels-static.json"


@pytest.mark.skipif(INTERPRETED, reason="reads committed results")
def test_committed_gptq_sweep_is_launchable_and_meets_the_goals():
    # benchmarks/gptq_kernels_static.py compiled every configuration of its sweep (4 archs x 4 widths x
    # dequantize / fused M buckets / GEMV M buckets) through the real launchers: no spill, shared
    # memory within the limit, and the model's goals held when it was committed.
    result = json.loads(RESULTS.read_text())
    configurations = result["configurations"]
    assert {row["arch"] for row in configurations} == {80, 86, 89, 90}
    assert {row["bits"] for row in configurations} == {2, 3, 4, 8}
    assert {row["kernel"] for row in configurations} == {"dequantize", "fused", "gemv"}
    bad = [row for row in configurations if row["local_bytes"] or row["blocks_per_sm"] < 1]
    bad += [row for row in result["kernels"] if row["shared_bytes"] > row["shared_limit"]]
    assert not bad, bad
    decode, training = result["goals"]["decode_sm90_gate_proj_4bit_g128_M1"], result["goals"]["training_M512_up"]
    # The model (benchmarks/gpu_model.py, calibrated) may not put our decode above the best published
    # hand-written CUDA int4 kernel on the H100 (Marlin, tinygemm): that would be a model error.
    assert decode["flagged_above_cuda"] == (decode["speedup_over_bf16"] > decode["best_published_cuda_speedup"])
    assert not decode["flagged_above_cuda"], decode
    assert training["worst_dispatched_over_dequant_cublas"] <= training["goal"] == 1.0


@pytest.mark.skipif(INTERPRETED, reason="reads committed results")
def test_gptq_dispatch_table_is_the_models():
    sys.path.insert(0, str(RESULTS.parents[1]))
    from gptq_kernels_static import dispatch_table

    from qlora.kernels.gptq.dispatch_table import PATHS
    from qlora.kernels.gptq.ops import choose_path, path_table

    dispatch = json.loads(RESULTS.read_text())["dispatch"]
    expected = {arch: {d: {bits: {shape: tuple(map(tuple, buckets)) for shape, buckets in shapes.items()}
                           for bits, shapes in by_bits.items()} for d, by_bits in directions.items()}
                for arch, directions in dispatch_table(dispatch).items()}
    assert PATHS == expected  # regenerate: python benchmarks/gptq_kernels_static.py --from-results ...
    for row in dispatch:
        shape = (row["N"], row["K"])
        assert choose_path(row["M"], torch.bfloat16, row["arch"], row["transpose_weight"], row["bits"], shape) == row["path"]
        if row["group_size"] == 128:  # the table's own group size: the model's fastest path at every M
            assert row["estimate_us"] <= 1.05 * row["best_estimate_us"], row
    for arch in PATHS:
        for m, bits, shape in itertools.product((1, 16, 300, 5000), (2, 3, 4, 8), ((1024, 4096), (14336, 4096))):
            assert choose_path(m, torch.float32, arch, True, bits, shape) != "fused"  # no tensor cores for fp32
            assert choose_path(m, torch.bfloat16, arch, False, bits, shape) != "gemv"  # the GEMV is forward only
            assert bits != 3 or choose_path(m, torch.bfloat16, arch, True, bits, shape) != "gemv"  # 3-bit straddles
    assert path_table(120, True, 4) == PATHS[max(PATHS)]["forward"][4][(4096, 4096)]  # a newer GPU: the newest arch modelled
    assert path_table(90, True, 4, (12288, 4096)) == PATHS[90]["forward"][4][(14336, 4096)]  # the nearest modelled shape
