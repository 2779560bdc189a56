"""The 4-bit format: bit-exact with bitsandbytes, pinned by golden vectors, clear errors."""
import itertools
import json
from pathlib import Path

import pytest
import torch

import qlora
from qlora.quant import dynamic_map, get_4bit_code
from helpers import bnb_functional, requires_bnb
from golden.make_format_vectors import golden_input

GOLDEN = json.loads((Path(__file__).parent / "golden" / "format_vectors.json").read_text())
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vectors(name):
    case = GOLDEN[name]
    w = golden_input(case["numel"], DTYPES[case["dtype"]])
    packed, state = qlora.quantize_4bit(w, case["quant_type"], case["blocksize"], case["double_quant"])
    serialized = state.as_dict()
    assert bytes(packed.flatten().tolist()).hex() == case["packed_hex"]
    assert serialized["absmax"].contiguous().view(torch.uint8).numpy().tobytes().hex() == case["absmax_hex"]
    if case["double_quant"]:
        assert serialized["nested_absmax"].numpy().tobytes().hex() == case["nested_absmax_hex"]
    blob = serialized[f"quant_state.bitsandbytes__{case['quant_type']}"]
    assert bytes(blob.tolist()).decode() == case["quant_state_json"]


def test_code_books_pinned():
    assert get_4bit_code("nf4")[[0, 7, 15]].tolist() == [-1.0, 0.0, 1.0]
    assert get_4bit_code("fp4")[[3, 9]].tolist() == pytest.approx([1.0, -0.0052083334885537624])
    code = dynamic_map()
    assert code.numel() == 256 and torch.all(code[1:] > code[:-1])
    assert code[-1].item() == 1.0 and code[0].item() == pytest.approx(-0.99297, abs=1e-5)


NUMELS = (1, 7, 64, 1001, 4096 * 3 + 5)


@requires_bnb
@pytest.mark.parametrize("quant_type,double_quant", list(itertools.product(("nf4", "fp4"), (True, False))))
@pytest.mark.parametrize("blocksize", (32, 64, 128, 256, 512, 1024, 2048, 4096))
def test_bit_exact_with_bitsandbytes(quant_type, double_quant, blocksize):
    bnb_f = bnb_functional()
    for dtype, numel in itertools.product(DTYPES.values(), NUMELS):
        w = (torch.randn(numel) * torch.rand(()) * 4).to(dtype)
        expected_packed, expected_state = bnb_f.quantize_4bit(
            w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        packed, state = qlora.quantize_4bit(w, quant_type, blocksize, double_quant)
        assert torch.equal(packed, expected_packed), (dtype, numel)
        expected = expected_state.as_dict(packed=True)
        ours = state.as_dict()
        assert ours.keys() == expected.keys()
        for key in expected:
            assert torch.equal(ours[key], expected[key]), (key, dtype, numel)
        # bitsandbytes returns 1-D weights as [1, n]; the values are what must agree.
        dense = bnb_f.dequantize_4bit(expected_packed, expected_state).reshape(-1)
        assert torch.equal(qlora.dequantize_4bit(packed, state).reshape(-1), dense)


@requires_bnb
@pytest.mark.parametrize("storage", (torch.bfloat16, torch.float16, torch.float32))
def test_storage_dtypes_match_bitsandbytes(storage):
    bnb_f = bnb_functional()
    w = torch.randn(64, 96)
    expected, _ = bnb_f.quantize_4bit(w, quant_type="nf4", quant_storage=storage)
    packed, state = qlora.quantize_4bit(w, quant_storage=storage)
    assert packed.dtype == storage and torch.equal(packed.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(qlora.dequantize_4bit(packed, state), qlora.dequantize_4bit(packed.view(torch.uint8), state))


def test_float_storage_never_passes_bytes_through_float_arithmetic():
    # Bytes that spell NaN in bf16 (0x7FC1, 0xFFFF) must come back unchanged.
    w = torch.randn(8, 64)
    packed, state = qlora.quantize_4bit(w)
    raw = packed.view(torch.uint8).clone()
    raw[:4, 0] = torch.tensor([0xC1, 0x7F, 0xFF, 0xFF], dtype=torch.uint8)
    as_bf16 = raw.flatten().view(torch.bfloat16)
    layer = qlora.Linear4bit(64, 8, bias=False, compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    layer.set_quantized(as_bf16, state)
    layer.to(torch.float32)
    assert torch.equal(layer.weight.view(torch.uint8).flatten(), raw.flatten())


def test_all_equal_absmax_and_zero_blocks():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    packed, state = qlora.quantize_4bit(w, double_quant=True)
    assert torch.equal(qlora.dequantize_4bit(packed, state), w)


@requires_bnb
def test_round_trip_error_within_bitsandbytes():
    bnb_f = bnb_functional()
    w = torch.randn(1024, 1024)
    for quant_type in ("nf4", "fp4"):
        packed, state = qlora.quantize_4bit(w, quant_type)
        ours = (qlora.dequantize_4bit(packed, state) - w).abs().mean()
        p, s = bnb_f.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
        theirs = (bnb_f.dequantize_4bit(p, s) - w).abs().mean()
        assert ours <= theirs * (1 + 1e-6)


def test_round_trip_error_is_nf4_sized():
    w = torch.randn(512, 512)
    packed, state = qlora.quantize_4bit(w)
    rel = (qlora.dequantize_4bit(packed, state) - w).norm() / w.norm()
    assert 0.05 < rel < 0.12  # NF4 on N(0,1) blocks of 64: ~0.094


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(blocksize=48), ValueError, "blocksize must be a power of two in [32, 4096], got 48"),
        (dict(quant_type="int4"), ValueError, "quant_type must be 'nf4' or 'fp4', got 'int4'"),
        (dict(quant_storage=torch.int32), ValueError, "quant_storage must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        qlora.quantize_4bit(torch.randn(64), **kwargs)


def test_integer_weight_is_rejected():
    with pytest.raises(TypeError, match="needs a float32, float16 or bfloat16 tensor, got torch.int64"):
        qlora.quantize_4bit(torch.arange(64))


def test_storage_that_does_not_divide_the_bytes():
    with pytest.raises(ValueError, match="quant_storage=torch.float32 needs the packed size"):
        qlora.quantize_4bit(torch.randn(10), quant_storage=torch.float32)


def test_state_from_dict_errors():
    packed, state = qlora.quantize_4bit(torch.randn(16, 64))
    good = state.as_dict()
    with pytest.raises(ValueError, match="missing nested_absmax"):
        qlora.QuantState.from_dict({k: v for k, v in good.items() if k != "nested_absmax"}, where="w")
    garbled = dict(good, **{"quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 3], dtype=torch.uint8)})
    with pytest.raises(ValueError, match="is garbled"):
        qlora.QuantState.from_dict(garbled, where="w")
    with pytest.raises(ValueError, match=r"expected exactly one 'quant_state.bitsandbytes__<nf4\|fp4>' entry"):
        qlora.QuantState.from_dict({k: v for k, v in good.items() if not k.startswith("quant_state")}, where="w")
    short = dict(good, absmax=good["absmax"][:-1])
    with pytest.raises(ValueError, match="absmax has 15 values, but shape \\[16, 64\\] with blocksize 64 needs 16"):
        qlora.QuantState.from_dict(short, where="w")
