"""The CPU 4-bit quantize (C, kernels/nf4/cpu_quantize.c) against its PyTorch twin: the same packed
bytes and absmax bit for bit (and so bitsandbytes', which the twin is pinned to in test_quant.py),
on odd shapes, every blocksize, NF4 and FP4, with and without double quant, every input dtype, and
on the values where a rule decides: midpoint ties, one float either side, zeros of both signs,
subnormals, all-zero and all-subnormal blocks, inf and NaN. Every test at 1 and 2 threads.
"""
import pytest
import torch

import qlora
from qlora.kernels import set_backend
from qlora.kernels.nf4 import cpu as nf4_cpu
from qlora.quant.nf4 import quantize as quantize_module
from qlora.quant.nf4.codes import quantize_bounds

needs_compiler = pytest.mark.skipif(not nf4_cpu.quantize_available(), reason="no C compiler: the quantize is the twin")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def assert_twins_bytes(w, blocksize, quant_type):
    midpoints, order = quantize_bounds(quant_type, "cpu")
    packed, absmax = nf4_cpu.quantize_4bit_cpu(w, blocksize, midpoints, order)
    want_packed, want_absmax = quantize_module._quantize_4bit_codes_torch(w, blocksize, quant_type)
    assert torch.equal(packed, want_packed), f"{(packed != want_packed).sum().item()} of {packed.numel()} bytes differ"
    assert torch.equal(absmax.view(torch.int32), want_absmax.view(torch.int32)), "absmax differs"


@needs_compiler
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 97), (5, 1000), (130, 257)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_weights(threads, shape, quant_type, dtype):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    for blocksize in (32, 64, 4096):
        assert_twins_bytes(w, blocksize, quant_type)


@needs_compiler
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize_on_a_weight_split_over_threads(threads, blocksize):
    # 600 x 1001: many blocks per thread, a partial last block, an odd element count.
    w = torch.randn(600, 1001, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        assert_twins_bytes(w, blocksize, quant_type)


def decisive_values(quant_type):
    """Values in [-1, 1] where the nearest-code rule decides: every midpoint (a tie goes to the lower
    sorted code), one float either side, the codes, zeros of both signs, subnormals."""
    midpoints, _ = quantize_bounds(quant_type, "cpu")
    code = qlora.quant.get_4bit_code(quant_type)
    return torch.cat((midpoints, midpoints.nextafter(torch.tensor(-2.0)), midpoints.nextafter(torch.tensor(2.0)),
                      code, torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-45, 1.0, -1.0])))


@needs_compiler
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_midpoint_ties_zeros_and_subnormals(threads, quant_type, blocksize):
    # A 1.0 at the head of each block makes its absmax 1 and its reciprocal 1: the scaled values are
    # the values themselves. The tail block divides instead of multiplying: it is covered too.
    values = decisive_values(quant_type)
    chunks = values.split(blocksize - 1)
    w = torch.cat([torch.cat((torch.ones(1), chunk)) for chunk in chunks] + [values[:37]])
    assert_twins_bytes(w, blocksize, quant_type)
    # Scaled by a power of two (exact) and by a non-power (the reciprocal's rounding decides ties).
    assert_twins_bytes(w * 0.25, blocksize, quant_type)
    assert_twins_bytes(w * 0.0123, blocksize, quant_type)


@needs_compiler
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_subnormal_and_non_finite_blocks(threads, quant_type, dtype):
    w = torch.randn(64 * 8 + 37, generator=torch.Generator().manual_seed(2))
    w[0:64] = 0.0  # absmax 0: clamped to 1e-38, scaled to 0
    w[64:128] = -0.0
    w[128:192] = torch.linspace(-1e-39, 1e-39, 64)  # absmax below the clamp: subnormal arithmetic
    w[200] = float("inf")  # absmax inf: reciprocal 0, inf * 0 = NaN, the rest 0
    w[260] = -float("inf")
    w[330] = float("nan")  # absmax NaN: the whole block NaN, position 15
    w[-5] = float("nan")  # in the partial last block, which divides
    w[3000 % w.numel()] = 3e38
    assert_twins_bytes(w.to(dtype), 64, quant_type)


@needs_compiler
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_4bit_state_is_the_twins(threads, quant_type, double_quant):
    w = torch.randn(130, 257, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    results = []
    for backend in ("cpu", "torch"):
        set_backend(backend)
        try:
            results.append(qlora.quantize_4bit(w, quant_type, 64, double_quant))
        finally:
            set_backend(None)
    (packed, state), (want_packed, want_state) = results
    assert torch.equal(packed, want_packed)
    for name in ("absmax", "nested_absmax", "offset"):
        got, want = getattr(state, name, None), getattr(want_state, name, None)
        assert (got is None and want is None) or torch.equal(got, want), name


@needs_compiler
def test_auto_takes_the_c_quantize_and_torch_forces_the_twin(monkeypatch):
    assert quantize_module.selfcheck.passed("cpu_quantize", torch.device("cpu"), torch.float32)
    calls = []
    real = nf4_cpu.quantize_4bit_cpu
    monkeypatch.setattr(nf4_cpu, "quantize_4bit_cpu", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(8, 64)
    for backend, expected in (("auto", 1), ("cpu", 2), ("torch", 2)):
        monkeypatch.setenv("QLORA_BACKEND", backend)
        qlora.quantize_4bit(w)
        assert len(calls) == expected, backend
