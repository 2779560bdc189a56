"""LLM.int8: the quantizer byte for byte with bitsandbytes, the forward against its definition and
against bitsandbytes, the backward, the format behind the QuantizedWeight interface, and the
errors a user can cause."""
import logging

import pytest
import torch
import torch.nn.functional as F

import qlora
from qlora.quant.config import quant_config_from_any
from qlora.kernels.int8 import ops as int8_ops
from qlora.kernels import set_backend
from qlora.kernels.int8.reference import int8_linear_torch
from qlora.nn.quantized import layer_class
from qlora.quant import get_format
from helpers import rel_err, requires_bnb

SHAPES = [(1, 1), (3, 7), (37, 95), (64, 1), (5, 130)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes
    import bitsandbytes.functional as bnb_f

    return bitsandbytes, bnb_f


def _with_zero_row(shape, dtype):
    a = (torch.randn(shape) * 3).to(dtype)
    a[shape[0] // 2] = 0
    return a


@requires_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_vectorwise_quant_is_bitsandbytes_byte_for_byte(shape, dtype):
    _, bnb_f = _bnb()
    a = _with_zero_row(shape, dtype)
    codes, scb, cols = qlora.int8_vectorwise_quant(a)
    ref_codes, ref_scb, ref_cols = bnb_f.int8_vectorwise_quant(a.clone())
    assert codes.dtype == torch.int8 and scb.dtype == torch.float32 and cols is None and ref_cols is None
    assert torch.equal(codes, ref_codes) and torch.equal(scb, ref_scb)
    assert (codes[shape[0] // 2] == 0).all() and scb[shape[0] // 2] == 0


@requires_bnb
@pytest.mark.parametrize("dtype", DTYPES)
def test_outlier_columns_and_codes_match_bitsandbytes(dtype):
    _, bnb_f = _bnb()
    a = torch.randn(9, 70).to(dtype)
    a[2, 5], a[7, 44], a[0, 44] = 9.0, -12.0, 7.5
    codes, scb, cols = qlora.int8_vectorwise_quant(a, threshold=6.0)
    ref_codes, ref_scb, ref_cols = bnb_f.int8_vectorwise_quant(a.clone(), threshold=6.0)
    assert cols.tolist() == ref_cols.tolist() == [5, 44]
    assert torch.equal(codes, ref_codes) and torch.equal(scb, ref_scb)


def _outlier_input(m=6, k=96, dtype=torch.float32):
    x = torch.randn(m, k, dtype=torch.float64)
    x[1, 3], x[4, 50], x[0, 50] = 20.0, -35.0, 8.0  # columns 3 and 50 hold outliers
    return x.to(dtype)


def test_forward_is_within_the_int8_activation_rounding_of_the_dequantized_product():
    # Outside the outlier columns |x - CA SCA / 127| <= SCA / 254 per element, so each output is off
    # by at most SCA / 254 * sum_k |W_jk| (+ fp32 rounding); outlier columns are exact in fp32.
    w = torch.randn(40, 96)
    weight = qlora.Weight8bit.quantize(w, threshold=6.0)
    x = _outlier_input()
    dense = weight.dequantize(torch.float64)
    exact = x.double() @ dense.T
    got = weight.linear(x)
    inliers = x.double().abs() < 6.0
    inlier_cols = ~(~inliers).any(dim=0)
    sca = x.double().where(inliers, 0).abs().amax(dim=1)
    bound = sca[:, None] / 254 * dense[:, inlier_cols].abs().sum(dim=1)[None, :]
    fp32_slack = 96 * torch.finfo(torch.float32).eps * (x.double().abs() @ dense.abs().T)
    assert ((got.double() - exact).abs() <= bound + fp32_slack).all()
    # Without the decomposition the outliers set SCA: the error grows by the outlier/inlier ratio.
    no_decomposition = int8_ops.linear_int8(x, weight.codes, weight.scb, None, threshold=0.0)
    assert rel_err(got, exact) * 3 < rel_err(no_decomposition, exact)


@requires_bnb
def test_forward_matches_bitsandbytes_eval_mode_with_outliers():
    # bitsandbytes' eval (inference) path: int8 activations, outliers in 16-bit. (Its train mode on CPU
    # multiplies by the dequantized weight instead, a different function.) In fp16 both quantize the
    # same activations; they differ by bitsandbytes' 6.200124e-05 for 1/127^2 (1.8e-5 relative) and
    # fp16 output rounding (eps 9.8e-4 per element).
    bnb, _ = _bnb()
    w = torch.randn(48, 128)
    bias = torch.randn(48)
    layer = bnb.nn.Linear8bitLt(128, 48, bias=True, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = torch.nn.Parameter(bias.clone())
    layer = layer.to("cpu").eval()
    x = _outlier_input(8, 128, torch.float16)
    with torch.no_grad():
        ref = layer(x)
    weight = qlora.Weight8bit.quantize(w, threshold=6.0)
    assert torch.equal(weight.codes, layer.state.CB) and torch.equal(weight.scb, layer.state.SCB)
    got = weight.linear(x, bias.half())
    assert got.dtype == torch.float16
    assert rel_err(got, ref) < 2e-3


def test_threshold_zero_disables_the_decomposition():
    w = torch.randn(16, 64)
    weight = qlora.Weight8bit.quantize(w, threshold=0.0)
    x = _outlier_input(6, 64)
    codes, sca, cols = qlora.int8_vectorwise_quant(x, threshold=0.0)
    assert cols is None
    manual = (codes.double() @ weight.codes.double().T) * sca[:, None].double() * weight.scb.double()[None, :] / 127**2
    assert torch.allclose(weight.linear(x).double(), manual, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_dy_times_the_dequantized_weight_and_the_bias_sum(dtype):
    weight = qlora.Weight8bit.quantize(torch.randn(24, 40))
    x = torch.randn(2, 3, 40, dtype=dtype, requires_grad=True)
    bias = torch.randn(24, dtype=dtype, requires_grad=True)
    y = weight.linear(x, bias)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    expected = (dy.reshape(-1, 24).float() @ weight.dequantize(torch.float32)).reshape(x.shape)
    tolerance = 4 * torch.finfo(dtype).eps * 24 ** 0.5
    assert rel_err(x.grad, expected) < tolerance
    assert rel_err(bias.grad, dy.float().sum((0, 1))) < tolerance


def test_custom_ops_have_fake_impls_and_autograd():
    weight = qlora.Weight8bit.quantize(torch.randn(8, 16))
    x = torch.randn(3, 16, requires_grad=True)
    torch.library.opcheck(int8_ops.int8_linear, (x, weight.codes, weight.scb, torch.randn(8), 6.0))
    torch.library.opcheck(int8_ops.int8_dequantize, (weight.codes, weight.scb, torch.bfloat16))


def test_format_registered_with_its_layer_and_every_path_dispatches_through_the_op():
    assert get_format("int8") is qlora.Weight8bit and layer_class("int8") is qlora.Linear8bit
    layer = qlora.Linear8bit.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.float32)
    set_backend("triton")
    try:
        for call in (lambda: layer.dequantize(), lambda: layer(torch.randn(2, 64)),
                     lambda: F.linear(torch.randn(2, 64), layer.quantized_weight)):
            with pytest.raises(RuntimeError, match="QLORA_BACKEND=triton cannot run on cpu tensors"):
                call()
    finally:
        set_backend(None)


def test_layer_state_dict_is_bitsandbytes_keys_and_round_trips():
    linear = torch.nn.Linear(64, 32)
    layer = qlora.Linear8bit.from_linear(linear, compute_dtype=torch.float32, threshold=4.0)
    state = layer.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {"weight": torch.int8, "SCB": torch.float32,
                                                      "weight_format": torch.uint8, "bias": torch.float32}
    assert int(state["weight_format"]) == 0
    fresh = qlora.Linear8bit(64, 32, compute_dtype=torch.float32, threshold=4.0)
    fresh.load_state_dict(state)
    assert fresh.threshold == 4.0 and fresh.quantized_weight.threshold == 4.0
    assert torch.equal(fresh.dequantize(torch.float32), layer.dequantize(torch.float32))
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))
    assert rel_err(layer(x), linear(x)) < 2e-2  # two int8 roundings: ~1/254 of a row's range each
    assert layer.quantized_weight.nbytes == 32 * 64 + 32 * 4


def test_config_reads_and_writes_the_8bit_fields_of_bitsandbytesconfig():
    from transformers import BitsAndBytesConfig

    cfg = quant_config_from_any(BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=3.5,
                                                   llm_int8_skip_modules=["lm_head", "mlp.down_proj"]))
    assert isinstance(cfg, qlora.Int8Config) and cfg.format == "int8"
    assert cfg.threshold == 3.5 and cfg.skip_modules == ["lm_head", "mlp.down_proj"]
    written = cfg.to_hf_dict()
    again = BitsAndBytesConfig.from_dict(written)
    assert again.load_in_8bit and not again.load_in_4bit and again.llm_int8_threshold == 3.5
    assert quant_config_from_any(written) == cfg


@pytest.mark.parametrize("bad, message", [
    (dict(load_in_8bit=True, llm_int8_threshold=-1.0), r"llm_int8_threshold must be a number >= 0 .* got -1.0"),
    (dict(load_in_8bit=True, load_in_4bit=True), "sets both load_in_4bit and load_in_8bit; choose one"),
    (dict(load_in_8bit=True, llm_int8_has_fp16_weight=True),
     "llm_int8_has_fp16_weight=True keeps a trainable 16-bit copy .* set llm_int8_has_fp16_weight=False"),
])
def test_config_errors_name_the_field_and_the_fix(bad, message):
    with pytest.raises((ValueError, NotImplementedError), match=message):
        quant_config_from_any({"quant_method": "bitsandbytes", **bad})


def _checkpoint(codes_shape=(8, 16)):
    weight = qlora.Weight8bit.quantize(torch.randn(*codes_shape))
    return dict(weight.checkpoint_tensors())


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("SCB"), "the checkpoint has the int8 weight but no SCB"),
    (lambda t: t.__setitem__("SCB", torch.ones(3)), r"SCB must be float \[8\] .* got torch.float32 \[3\]"),
    (lambda t: t.__setitem__("SCB", torch.full((8,), float("nan"))), "SCB holds negative, NaN or infinite"),
    (lambda t: t.__setitem__("weight_format", torch.tensor(2, dtype=torch.uint8)), "weight_format is col_turing"),
    (lambda t: t.__setitem__("weight_format", "col32"), "weight_format is col32"),
    (lambda t: t.__setitem__("weight_format", torch.tensor(7, dtype=torch.uint8)), "weight_format 7 is not one"),
    (lambda t: t.__setitem__("weight", t["weight"].float()), "an LLM.int8 weight is int8"),
])
def test_checkpoint_errors_name_the_layer_and_the_problem(edit, message):
    tensors = _checkpoint()
    edit(tensors)
    with pytest.raises(ValueError, match=f"model.layers.0.mlp.up_proj.weight: {message}"):
        qlora.Weight8bit.from_checkpoint(tensors, where="model.layers.0.mlp.up_proj.weight")


def test_old_string_row_format_loads():
    tensors = _checkpoint()
    tensors["weight_format"] = "row"
    weight = qlora.Weight8bit.from_checkpoint(tensors)
    assert torch.equal(weight.codes, tensors["weight"])


def test_shape_mismatch_is_refused_by_the_layer():
    layer = qlora.Linear8bit(16, 8, bias=False)
    with pytest.raises(RuntimeError, match=r"quant_state shape \[4, 16\] does not match the layer \[8, 16\]"):
        layer.load_state_dict(_checkpoint((4, 16)))


def test_weights_beyond_fp16_range_are_refused():
    with pytest.raises(ValueError, match="beyond fp16's range"):
        qlora.Weight8bit.quantize(torch.full((2, 2), 1e6))
