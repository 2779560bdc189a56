"""The family battery: every row of model_families.FAMILIES, written by transformers' own
save_pretrained, loads in 4 bits with nothing large left 16-bit, takes the footprint NF4 + double
quant predicts, and computes what a dense model computes whose every quantized matrix went through
dequant(quant(W)) (simulated quantization, an fp32 model built by transformers itself)."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import qlora
from qlora.nn import QuantizedLinear
from qlora.quant.nf4.weight import Weight4bit
from helpers import rel_err
from model_families import FAMILIES, VOCAB

FP32 = qlora.QuantConfig(compute_dtype=torch.float32)
# "No weight matrix above a few thousand elements stays 16-bit": the battery looks at anything above
# 1024 elements (the tiny models' smallest linear is 2048), stricter than the loader's own refusal.
SMALL_MATRIX = 1024
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127: 4-bit codes, uint8 absmax per 64, fp32 per 256 absmax


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB - 8, (2, 11), generator=torch.Generator().manual_seed(0))


def save_family(family, directory, dtype=torch.bfloat16):
    """The tiny random model of `family`, written by transformers (in bf16, as checkpoints are)."""
    torch.manual_seed(0)
    model = family.auto.from_config(family.config())
    model.to(dtype).save_pretrained(directory)
    return directory


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def left_16bit(model, dense_modules) -> list[str]:
    """Floating weight matrices above SMALL_MATRIX elements outside embeddings, the head and dense_modules."""
    head = model.get_output_embeddings()
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, nn.Embedding)) or module is head:
            continue
        if any(module_name == p or module_name.startswith(p + ".") for p in dense_modules):
            continue
        found += [f"{module_name}.{n}" for n, p in module.named_parameters(recurse=False)
                  if p.dim() >= 2 and p.numel() > SMALL_MATRIX and p.dtype.is_floating_point]
    return found


def simulate_quantization(model, quantized: list[str]):
    """Replace each of `quantized` in transformers' fp32 `model` by dequant(quant(W)), W as the checkpoint
    stores it (bf16), quantized by qlora's NF4 reference (bitsandbytes' bytes, tested in test_quant_format)."""
    with torch.no_grad():
        for name in quantized:
            module = model.get_submodule(name)
            transposed = isinstance(module, Conv1D)  # [in, out]: quantized as [out, in], like bitsandbytes
            weight = module.weight.t() if transposed else module.weight
            simulated = Weight4bit.quantize(weight.to(torch.bfloat16).contiguous()).dequantize(torch.float32)
            module.weight.copy_(simulated.t() if transposed else simulated)


def bf16_footprint(model) -> tuple[int, int, int]:
    """(bytes of the loaded model with its dense parts counted in bf16, bytes of the bf16 model, elements of
    its quantized matrices): qlora.memory_footprint's accounting, with fp32 dense tensors counted at 2 bytes."""
    quantized_tensors = {id(t) for m in model.modules() if isinstance(m, QuantizedLinear)
                         for t in [m.weight, *m.buffers(recurse=False)] if t is not None and t is not m.bias}
    loaded = qlora.memory_footprint(model, buffers=False)
    seen, dense_bytes, quantized_elements, shared_bytes = set(), 0, 0, 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            quantized_elements += m.in_features * m.out_features
    for t in [*model.parameters(), *(b for m in model.modules() if isinstance(m, QuantizedLinear)
                                     for b in m.buffers(recurse=False) if b is not None)]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        if id(t) in quantized_tensors:
            shared_bytes += t.numel() * t.element_size()
        else:
            dense_bytes += t.numel() * 2
    del loaded
    bf16_model = 2 * (quantized_elements + dense_bytes // 2)
    return dense_bytes + shared_bytes, bf16_model, quantized_elements


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_family_loads_quantized_and_computes_the_simulation(family, tmp_path, ids):
    directory = save_family(family, tmp_path / family.name)
    model = qlora.load_model(directory, FP32, device="cpu", dtype=torch.float32, progress=False)
    assert [type(model).__name__] == model.config.architectures  # the class save_pretrained recorded
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) >= 4 * model.config.get_text_config().num_hidden_layers
    assert left_16bit(model, family.dense_modules) == []
    # The vision side is 16-bit by default, and only it.
    assert not [n for n in quantized if any(n.startswith(p + ".") for p in family.dense_modules)]

    # Footprint: every quantized matrix at NF4 + DQ's 4.127 bits (+ the code books, shared), the rest bf16.
    loaded, bf16, elements = bf16_footprint(model)
    expected = bf16 - elements * (16 - NF4_DQ_BITS) / 8
    assert loaded == pytest.approx(expected, rel=0.02), (loaded, expected, bf16)

    # Logits: those of transformers' own fp32 model carrying dequant(quant(W)), up to summation order.
    reference = family.auto.from_pretrained(directory, dtype=torch.float32).eval()
    ours, dense = logits(model, ids), logits(reference, ids)
    simulate_quantization(reference, quantized)
    assert rel_err(ours, logits(reference, ids)) < 1e-5
    assert rel_err(ours, dense) > 1e-4  # and the quantization is there to see
