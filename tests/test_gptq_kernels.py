"""The GPTQ Triton kernels against their PyTorch twins (gptq_reference.py), in the interpreter
(fp16/fp32: the interpreter has no bf16 arithmetic), and compiled for sm_80/89/90.

As in test_kernels.py, the interpreter is chosen when a kernel is decorated, so the `interp_`
tests run in a child pytest with TRITON_INTERPRET=1 started by `test_gptq_kernels_in_interpreter`.
"""
import os

import pytest
import torch

import qlora
from qlora.kernels.gptq_reference import dequantize_gptq_torch, matmul_gptq_torch
from qlora.quant.gptq_solver import gptq_quantize
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
    from qlora.kernels.gptq_triton import dequantize_gptq_triton

    packed = weight(bits, n, k, group_size, act_order, sym)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(dequantize_gptq_triton(packed, dtype), dequantize_gptq_torch(packed, dtype))


@interpreter_only
@pytest.mark.parametrize("bits, n, k, group_size, act_order, sym", CASES)
@pytest.mark.parametrize("m", [0, 1, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_fused_forward_and_backward(bits, n, k, group_size, act_order, sym, m, dtype):
    from qlora.kernels.gptq_triton import matmul_gptq_backward, matmul_gptq_forward

    packed = weight(bits, n, k, group_size, act_order, sym)
    x, grad, bias = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype), torch.randn(n, dtype=dtype)
    # fp32 accumulation of products of dtype-rounded operands: error ~ eps(dtype) * sqrt(K)
    tolerance = 4 * torch.finfo(dtype).eps * max(k, n) ** 0.5
    forward, expected = matmul_gptq_forward(x, packed, bias), matmul_gptq_torch(x.float(), packed, bias.float(), True)
    backward, expected_grad = matmul_gptq_backward(grad, packed), matmul_gptq_torch(grad.float(), packed, None, False)
    assert forward.shape == (m, n) and backward.shape == (m, k)
    if m:
        assert rel_err(forward, expected) < tolerance and rel_err(backward, expected_grad) < tolerance


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
    from qlora.kernels.gptq_triton import dequantize_gptq_triton, matmul_gptq_backward, matmul_gptq_forward
    from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK, TENSOR_CORE_MMAS, machine_code

    with launch.compile_only(arch) as compiled:
        # Every width on sm_90; on sm_80/89 the straddling 3-bit decode and 4-bit act-order (compile time is CI time).
        for bits in (2, 3, 4, 8) if arch == 90 else (3, 4):
            packed = weight(bits, 64, 128, 32, act_order=bits == 4)
            dtype = torch.bfloat16  # the training dtype (fp16 lowers the same way; the interpreter covers its values)
            dequantize_gptq_triton(packed, dtype)
            for m in (1, 64):  # BLOCK_M 16 and 64
                matmul_gptq_forward(torch.randn(m, 128, dtype=dtype), packed, torch.randn(64, dtype=dtype))
                matmul_gptq_backward(torch.randn(m, 64, dtype=dtype), packed)
    assert len(compiled) == (4 if arch == 90 else 2) * 5
    for launched in compiled:
        code = machine_code(launched.kernel, arch)
        assert code.local_bytes == 0, (launched.name, launched.constexprs)  # no register spills
        assert code.shared_bytes <= MAX_SHARED_PER_BLOCK[arch] and code.blocks_per_sm >= 1
        if launched.name != "_dequantize_kernel":  # the products run on the tensor cores
            assert code.count(TENSOR_CORE_MMAS) > 0, (launched.name, launched.constexprs)
