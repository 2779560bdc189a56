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


def nf4_dq_bytes(elements: int) -> int:
    """Bytes of one NF4 + double-quant matrix (blocksize 64, nested 256): two codes a byte, a uint8 absmax
    code per block, an fp32 scale per 256 absmax codes and the fp32 offset (their mean): 4.127 bits/weight.
    The 16 + 256 fp32 code books are shared by all layers."""
    blocks = -(-elements // 64)
    return -(-elements // 2) + blocks + 4 * -(-blocks // 256) + 4


CODE_BOOKS = 4 * (16 + 256)


def bf16_footprint(model) -> tuple[int, int, int]:
    """(bytes of the loaded model, bytes it would have with every quantized matrix at nf4_dq_bytes, bytes
    of the same model in bf16), dense tensors counted at 2 bytes (they are fp32 here for the logit
    comparison) and each shared tensor once, as qlora.memory_footprint counts."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    quantized_state = [t for m in layers for t in (m.weight, *m.buffers(recurse=False)) if t is not None]
    quantized_ids = {id(t) for t in quantized_state}
    seen, loaded, dense_elements = set(), 0, 0
    for t in [*model.parameters(), *quantized_state]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        if id(t) in quantized_ids:
            loaded += t.numel() * t.element_size()
        else:
            dense_elements += t.numel()
            loaded += 2 * t.numel()
    sizes = [m.in_features * m.out_features for m in layers]
    predicted = 2 * dense_elements + sum(nf4_dq_bytes(n) for n in sizes) + CODE_BOOKS
    return loaded, predicted, 2 * (dense_elements + sum(sizes))


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

    # Footprint: every quantized matrix at NF4 + DQ's 4.127 bits (+ the shared code books), the rest bf16: to
    # the byte. (The ratio to bf16 is 0.38-0.70 on these tiny models, whose embeddings weigh most.)
    loaded, predicted, bf16 = bf16_footprint(model)
    assert loaded == predicted, (loaded, predicted, bf16)

    # Logits: those of transformers' own fp32 model carrying dequant(quant(W)), up to summation order.
    reference = family.auto.from_pretrained(directory, dtype=torch.float32).eval()
    ours, dense = logits(model, ids), logits(reference, ids)
    simulate_quantization(reference, quantized)
    assert rel_err(ours, logits(reference, ids)) < 1e-5
    assert rel_err(ours, dense) > 1e-4  # and the quantization is there to see
