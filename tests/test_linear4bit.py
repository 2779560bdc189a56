"""The 4-bit linear layer against an fp64 reference, its state dict, devices and errors."""
import pytest
import torch

import qlora
from qlora.nn import Linear4bit
from helpers import rel_err

# Relative error of the layer vs fp64 math on the same dequantized weight: compute-dtype rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_layer(in_features=320, out_features=96, bias=True, **options):
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    return linear, Linear4bit.from_linear(linear, **options)


@pytest.mark.parametrize("compute_dtype", list(TOLERANCE))
@pytest.mark.parametrize("blocksize", (64, 128))
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_forward_backward_against_fp64(compute_dtype, blocksize, quant_type):
    _, layer = make_layer(quant_type=quant_type, blocksize=blocksize, compute_dtype=compute_dtype)
    x = torch.randn(3, 37, 320, dtype=torch.float32, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    w = layer.dequantize(torch.float64)
    b = layer.bias.double()
    x64 = x.detach().double().to(compute_dtype).double()  # the layer sees x rounded to compute dtype
    assert y.dtype == x.dtype and y.shape == (3, 37, 96)
    assert rel_err(y, x64 @ w.T + b) < TOLERANCE[compute_dtype]
    assert rel_err(x.grad, grad_y.double().to(compute_dtype).double() @ w) < TOLERANCE[compute_dtype]
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_non_contiguous_input_and_bias_grad():
    _, layer = make_layer(compute_dtype=torch.float32)
    layer.bias.requires_grad_(True)
    x = torch.randn(320, 37).T  # non-contiguous
    y = layer(x)
    y.sum().backward()
    assert rel_err(y, x.double() @ layer.dequantize(torch.float64).T + layer.bias.double()) < 1e-5
    assert torch.allclose(layer.bias.grad, torch.full((96,), 37.0))


def test_backward_saves_packed_weight_not_dense():
    _, layer = make_layer(in_features=256, out_features=256, compute_dtype=torch.float32)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    sizes = sorted(t.numel() * t.element_size() for t in saved)
    dense_bytes = 256 * 256 * 4
    assert max(sizes) < dense_bytes / 4, sizes  # packed bytes are 1/8 of fp32


def test_matches_dense_linear_within_quantization_error():
    linear, layer = make_layer(compute_dtype=torch.float32)
    x = torch.randn(64, 320)
    assert rel_err(layer(x), linear(x)) < 0.15


def test_state_dict_round_trip_and_keys():
    _, layer = make_layer(compute_dtype=torch.float32)
    state = layer.state_dict()
    assert set(state) == {
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4", "bias",
    }
    fresh = Linear4bit(320, 96, compute_dtype=torch.float32)
    fresh.load_state_dict(state)
    x = torch.randn(5, 320)
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_without_double_quant_loads_into_dq_layer():
    _, layer = make_layer(double_quant=False, quant_type="fp4", blocksize=128, compute_dtype=torch.float32)
    fresh = Linear4bit(320, 96, compute_dtype=torch.float32)
    fresh.load_state_dict(layer.state_dict())
    assert (fresh.quant_type, fresh.blocksize, fresh.double_quant) == ("fp4", 128, False)
    x = torch.randn(5, 320)
    assert torch.equal(fresh(x), layer(x))


def test_load_state_dict_reports_bad_shapes():
    _, layer = make_layer(compute_dtype=torch.float32)
    other = Linear4bit(320, 95, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"quant_state shape \[96, 320\] does not match the layer \[95, 320\]"):
        other.load_state_dict(layer.state_dict())


def test_dtype_cast_keeps_format_and_device_move_keeps_bytes():
    _, layer = make_layer(compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.half()
    layer.to("meta").to_empty(device="cpu")  # a device round trip through meta reallocates
    _, layer = make_layer(compute_dtype=torch.float32)
    layer.load_state_dict(before)
    layer.to(torch.float16).to("cpu")
    after = layer.state_dict()
    for key in before:
        if key != "bias":
            assert torch.equal(before[key], after[key]), key
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32


def test_repr():
    _, layer = make_layer(blocksize=128)
    assert repr(layer) == (
        "Linear4bit(in_features=320, out_features=96, bias=True, quant_type=nf4, blocksize=128, "
        "double_quant=True, compute_dtype=bfloat16)"
    )


def test_storage_dtype_layer_computes_the_same():
    linear = torch.nn.Linear(128, 64)
    x = torch.randn(3, 128)
    outputs = [Linear4bit.from_linear(linear, compute_dtype=torch.float32, quant_storage=s)(x)
               for s in (torch.uint8, torch.bfloat16, torch.float16, torch.float32)]
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


def test_bad_weights():
    layer = Linear4bit(64, 32)
    with pytest.raises(ValueError, match=r"needs a 2-D \[out_features, in_features\] weight, got \(2048,\)"):
        layer.set_weight(torch.randn(2048))
    with pytest.raises(ValueError, match=r"weight shape \(64, 32\) does not match the layer"):
        layer.set_weight(torch.randn(64, 32))
    with pytest.raises(TypeError, match="got torch.int32"):
        layer.set_weight(torch.ones(32, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="input has 63 features"):
        Linear4bit.from_linear(torch.nn.Linear(64, 32))(torch.randn(2, 63))
