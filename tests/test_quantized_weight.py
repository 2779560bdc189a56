"""The quantized-weight interface: the format registry, Weight4bit, the op table, one dispatch for
every dequantize, and a new format plugging into the layer and the LoRA glue untouched."""
import dataclasses
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import qlora
from qlora.kernels import set_backend
from qlora.quant.config import register_quant_config
from qlora.lora import attach_lora
from qlora.nn import QuantizedLinear
from qlora.quant import QuantizedWeight, Weight4bit, get_format, register_format, registered_formats
from helpers import rel_err
from tiny_models import build_model


def test_registry_names_the_4bit_formats_and_refuses_unknown_ones():
    assert get_format("nf4") is Weight4bit and get_format("fp4") is Weight4bit
    assert {"nf4", "fp4"} <= set(registered_formats())
    with pytest.raises(ValueError, match=r"unknown quantized format 'int3'; registered formats: \[.*'nf4'"):
        get_format("int3")
    with pytest.raises(ValueError, match="already registered by Weight4bit"):
        register_format("nf4")(type("Other", (Weight4bit,), {}))


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_weight4bit_is_the_packed_bytes_and_quant_state(quant_type, double_quant):
    w = torch.randn(37, 95)
    weight = Weight4bit.quantize(w, quant_type=quant_type, blocksize=64, double_quant=double_quant)
    packed, state = qlora.quantize_4bit(w, quant_type, 64, double_quant)
    assert torch.equal(weight.packed, packed)
    assert torch.equal(weight.dequantize(torch.float32), qlora.dequantize_4bit(packed, state, torch.float32))
    # nbytes counts every tensor of the state: 0.5 byte/param packed, plus the scales.
    expected = packed.numel() + state.absmax.numel() * state.absmax.element_size() + 16 * 4
    if double_quant:
        expected += state.nested_absmax.numel() * 4 + 256 * 4 + 4
    assert weight.nbytes == expected
    # The checkpoint form is bitsandbytes' keys; rebuilding from it is exact.
    form = weight.checkpoint_tensors()
    assert set(form) >= {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"}
    again = Weight4bit.from_checkpoint(form, where="layer.weight")
    assert torch.equal(again.dequantize(torch.float32), weight.dequantize(torch.float32))


def test_moving_a_weight_never_requantizes_or_casts():
    weight = Weight4bit.quantize(torch.randn(16, 64), quant_storage=torch.bfloat16)
    moved = weight.to("cpu")
    assert isinstance(moved, Weight4bit) and moved.packed.dtype == torch.bfloat16
    # Compared as bytes: bf16 storage holds NaN bit patterns, and NaN != NaN.
    assert all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
               for a, b in zip(weight.tensors().values(), moved.tensors().values()))


def test_op_table_runs_linear_and_names_what_is_not_defined():
    weight = Weight4bit.quantize(torch.randn(24, 64))
    x = torch.randn(3, 64)
    dense = weight.dequantize(torch.float32)
    assert torch.allclose(F.linear(x, weight), x @ dense.T, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match=r"torch op 'matmul' is not defined on a quantized weight: "
                                                  r"call \.dequantize\(dtype\) first"):
        torch.matmul(x, weight)


def test_every_public_dequantize_goes_through_the_dispatching_op():
    # With the Triton backend forced on a CPU without the interpreter, a path that dispatches must
    # refuse; one that called the PyTorch twin directly would quietly succeed.
    layer = qlora.Linear4bit.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.float32)
    packed, state = layer.weight, layer.quant_state
    set_backend("triton")
    try:
        for call in (lambda: qlora.dequantize_4bit(packed, state), lambda: layer.dequantize(),
                     lambda: layer.quantized_weight.dequantize(torch.float32), lambda: layer(torch.randn(2, 64))):
            with pytest.raises(RuntimeError, match="QLORA_BACKEND=triton cannot run on cpu tensors"):
                call()
    finally:
        set_backend(None)


# ---- a new format plugs in without touching the layer or the LoRA glue ---------------------------
@register_format("test_rowwise_int8")
@dataclasses.dataclass
class RowwiseInt8Weight(QuantizedWeight):
    """A toy format (per-row absmax int8) declared as every real format is (qlora/quant/*/weight.py):
    its fields are the interface's contract, so the declaration parallels theirs on purpose."""

    data_name = "codes"
    data_key = "weight"
    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    @classmethod
    def quantize(cls, weight, **options):
        scales = weight.float().abs().amax(dim=1).clamp(min=1e-12)
        codes = torch.round(127 * weight.float() / scales[:, None]).to(torch.int8)
        return cls(codes=codes, scales=scales, shape=weight.shape, dtype=weight.dtype)

    @classmethod
    def placeholder(cls, out_features, in_features, device=None, compute_dtype=torch.bfloat16):
        return cls(codes=torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                   scales=torch.empty(out_features, device=device), shape=torch.Size((out_features, in_features)),
                   dtype=compute_dtype)

    @classmethod
    def from_checkpoint(cls, tensors, device="cpu", where=""):
        return cls(codes=tensors["weight"].to(device), scales=tensors["SCB"].to(device),
                   shape=tensors["weight"].shape, dtype=torch.float32)

    def checkpoint_tensors(self):
        return {"weight": self.codes, "SCB": self.scales}

    def dequantize(self, dtype):
        return (self.codes.float() * self.scales[:, None] / 127).to(dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), bias)


def test_a_registered_format_runs_in_the_generic_layer_and_takes_lora():
    model = build_model("llama")
    target = model.model.layers[0].mlp
    dense = target.down_proj
    weight = RowwiseInt8Weight.quantize(dense.weight.detach())
    target.down_proj = QuantizedLinear.from_weight(weight, compute_dtype=torch.float32)
    x = torch.randn(2, dense.in_features)
    assert rel_err(target.down_proj(x), dense(x)) < 2e-2  # int8 rounding: 1/254 of a row's range
    # state_dict in the format's own keys, and back
    state = target.down_proj.state_dict()
    assert set(state) == {"weight", "SCB"}  # the format's own keys, as LLM.int8 checkpoints spell them
    fresh = QuantizedLinear(dense.in_features, dense.out_features, bias=False, format="test_rowwise_int8",
                            compute_dtype=torch.float32)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.dequantize(torch.float32), target.down_proj.dequantize(torch.float32))
    # LoRA attaches to it like to a 4-bit layer, and gradients reach only the adapter.
    peft_model = attach_lora(model, r=4, target_modules=["down_proj"], gradient_checkpointing=False)
    loss = peft_model(input_ids=torch.randint(0, 128, (1, 8)), labels=torch.randint(0, 128, (1, 8))).loss
    loss.backward()
    names = [n for n, p in peft_model.named_parameters() if p.grad is not None]
    assert names and all("lora_" in n for n in names)


# ---- ... and into load_model / save_model through a registered config ---------------------------
@register_quant_config
@dataclasses.dataclass
class RowwiseInt8Config:
    compute_dtype: torch.dtype = torch.float32
    skip_modules: tuple = ("lm_head",)
    format = "test_rowwise_int8"

    def weight_options(self):
        return {}

    def to_hf_dict(self):
        return {"quant_method": "test_rowwise_int8", "skip_modules": list(self.skip_modules)}

    @classmethod
    def matches(cls, d):
        return d.get("quant_method") == "test_rowwise_int8"

    @classmethod
    def from_hf_dict(cls, d):
        return cls(skip_modules=tuple(d.get("skip_modules", ("lm_head",))))


class LinearRowwiseInt8(QuantizedLinear):
    weight_class = RowwiseInt8Weight

    def quant_config(self, skip_modules=None):
        return RowwiseInt8Config(skip_modules=tuple(skip_modules or ("lm_head",)))


def test_a_registered_format_loads_saves_and_reloads_through_the_generic_plumbing(tmp_path):
    dense = build_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    model = qlora.load_model(tmp_path / "dense", RowwiseInt8Config(), device="cpu", progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(type(m) is LinearRowwiseInt8 for m in layers)
    assert model.config.quantization_config["quant_method"] == "test_rowwise_int8"
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        logits = model(ids).logits
        assert rel_err(logits, dense(ids).logits) < 5e-2
    qlora.save_model(model, tmp_path / "saved")
    again = qlora.load_model(tmp_path / "saved", device="cpu", progress=False)  # pre-quantized: read as stored
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
