"""The LLM.int8 Triton kernels against their PyTorch twins (in a TRITON_INTERPRET=1 child: fp16/fp32,
odd shapes, tails, zero rows, outliers), and compiled for sm_80/89/90 through their real launchers:
no spills, shared memory within the block limit, the int8 product on the tensor cores."""
import os

import pytest
import torch

import qlora
from qlora.kernels.int8 import reference as reference
from qlora.kernels import launch, set_backend
from helpers import rel_err, run_interpreter_child

triton = pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child")
ARCHS = (80, 89, 90)
INT8_MMAS = ("IMMA", "IGMMA")  # int8 tensor-core MMA: mma.sync (sm_80/89) and wgmma (sm_90)


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run itself")
def test_int8_kernels_in_interpreter():
    run_interpreter_child(__file__)


def _weight(n, k):
    w = torch.randn(n, k)
    w[n // 2] = 0  # a zero row: SCB 0, codes 0
    return qlora.Weight8bit.quantize(w)


def _activations(m, k, dtype, outliers=True):
    a = torch.randn(m, k)
    if m > 1:
        a[m // 2] = 0
    if outliers:
        a[0, 3] = 9.0
        a[m - 1, k - 1] = -15.0
    return a.to(dtype)


@interp_only
@pytest.mark.parametrize("shape", [(1, 1), (37, 95), (16, 256), (64, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interp_dequantize_bit_exact(shape, dtype):
    from qlora.kernels.int8.dequantize import int8_dequantize_triton

    weight = _weight(*shape)
    assert torch.equal(int8_dequantize_triton(weight.codes, weight.scb, dtype),
                       reference.int8_dequantize_torch(weight.codes, weight.scb, dtype))


@interp_only
@pytest.mark.parametrize("m, k", [(1, 7), (5, 70), (33, 1100)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interp_activation_quantization_is_the_twin_byte_for_byte(m, k, threshold, dtype):
    from qlora.kernels.int8.matmul import quantize_rows_triton

    a = _activations(m, k, dtype)
    codes, sca, cols = reference.int8_vectorwise_quant_torch(a, threshold)
    mask = None
    if threshold > 0:
        mask = torch.zeros(k, dtype=torch.int8)
        mask[cols] = 1
    got_codes, got_sca = quantize_rows_triton(a, threshold, mask)
    assert torch.equal(got_sca, sca) and torch.equal(got_codes, codes)


@interp_only
@pytest.mark.parametrize("m, n, k", [(1, 24, 40), (5, 130, 70), (37, 64, 200)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interp_linear_matches_the_twin(m, n, k, threshold, dtype):
    from qlora.kernels.int8.matmul import int8_linear_triton

    weight = _weight(n, k)
    a = _activations(m, k, dtype)
    bias = torch.randn(n, dtype=dtype)
    got = int8_linear_triton(a, weight.codes, weight.scb, bias, threshold)
    expected = reference.int8_linear_torch(a, weight.codes, weight.scb, bias, threshold)
    assert got.dtype == dtype and got.shape == (m, n)
    # The same int32 sums and fp32 scalings; the twin rounds the int8 part to `dtype` before adding
    # the outlier part, the kernel once at the end: a couple of ulps of `dtype`, relative.
    assert rel_err(got, expected) < 4 * torch.finfo(dtype).eps


@interp_only
def test_interp_the_layer_forward_and_backward_run_the_kernels():
    weight = _weight(48, 96)
    x = _activations(6, 96, torch.float32).requires_grad_(True)
    set_backend("triton")
    try:
        y = weight.linear(x)
        y.backward(torch.ones_like(y))
        grad = x.grad.clone()
    finally:
        set_backend(None)
    x.grad = None
    expected = weight.linear(x)
    expected.backward(torch.ones_like(expected))
    assert rel_err(y, expected) < 4 * torch.finfo(torch.float32).eps
    assert rel_err(grad, x.grad) < 4 * torch.finfo(torch.float32).eps * 48 ** 0.5


# ---- compiled for the GPUs ------------------------------------------------------------------------
def compile_int8_launches(arch, dtype):
    from qlora.kernels.int8.dequantize import int8_dequantize_triton
    from qlora.kernels.int8.matmul import int8_linear_triton

    weight = _weight(96, 320)
    bias = torch.randn(96, dtype=dtype)
    with launch.compile_only(arch) as compiled:
        int8_dequantize_triton(weight.codes, weight.scb, dtype)
        for m in (1, 37):  # BLOCK_M 16 (decode) and 64, with outliers and a bias
            int8_linear_triton(_activations(m, 320, dtype), weight.codes, weight.scb, bias, 6.0)
        # BLOCK_M 32, no decomposition, no bias
        int8_linear_triton(_activations(32, 320, dtype, outliers=False), weight.codes, weight.scb, None, 0.0)
    return compiled


@pytest.mark.skipif(INTERPRETED, reason="compiles for a GPU")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)  # fp16 lowers as bf16 does
def test_int8_kernels_compile_without_spills_and_use_int8_mma(arch, dtype):
    from qlora.kernels.machine_code import MAX_SHARED_PER_BLOCK, machine_code

    compiled = compile_int8_launches(arch, dtype)
    names = [c.name for c in compiled]
    assert names.count("_int8_dequantize_kernel") == 1 and names.count("_int8_matmul_kernel") == 3
    assert names.count("_int8_quantize_rows_kernel") == 3
    for launched in compiled:
        code = machine_code(launched.kernel, arch)
        where = f"{launched.name} {launched.constexprs} on sm_{arch}"
        assert code.local_bytes == 0, f"{where} spills {code.local_bytes} bytes/thread"
        assert code.shared_bytes <= MAX_SHARED_PER_BLOCK[arch], f"{where} needs {code.shared_bytes} bytes of shared"
        assert code.blocks_per_sm >= 1, f"{where}: {code}"
        if launched.name == "_int8_matmul_kernel":
            assert code.count(INT8_MMAS) > 0, f"{where}: no int8 tensor-core MMA in {code.opcodes}"
