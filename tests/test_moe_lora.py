"""LoRA on 4-bit expert stacks: PEFT's target_parameters layout, trained here, loaded in plain PEFT on bf16."""
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qlora
from qlora.lora import attach_lora, describe_trainable
from qlora.lora_experts import ParamWrapper
from test_moe import simulated_quantization
from tiny_moe import save_tiny_moe


def _train(model, ids, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_expert_adapter_trains_and_loads_in_plain_peft(family, tmp_path):
    path = save_tiny_moe(family, tmp_path / family)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model = attach_lora(qlora.load_model(path, device="cpu", progress=False), r=4, lora_alpha=8, lora_dropout=0.0,
                        gradient_checkpointing=True)
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 4  # gate_up and down of 2 layers
    assert "on 4 expert stacks" in describe_trainable(model)
    losses = _train(model.train(), ids)
    assert losses[-1] < losses[0]
    expert_grads = [p for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert expert_grads and all(p.abs().sum() > 0 for p in expert_grads)  # trained, not left at B = 0
    model.save_pretrained(tmp_path / "adapter")

    # The same keys as PEFT's own adapter on the bf16 model.
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    config = LoraConfig.from_pretrained(tmp_path / "adapter")
    assert sorted(config.target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    stock = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=sorted(config.target_modules),
                                      target_parameters=sorted(config.target_parameters)))
    stock_keys = set(get_peft_model_state_dict(stock))
    assert set(saved) == stock_keys
    for key, tensor in get_peft_model_state_dict(stock).items():
        assert tuple(saved[key].shape) == tuple(tensor.shape), key

    # Loaded by stock PeftModel on the bf16 model whose matrices went through dequant(quant(W)): the same logits.
    reference = simulated_quantization(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(),
                                       model.get_base_model())
    plain = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
        theirs = plain(input_ids=ids).logits.float()
        with plain.disable_adapter():
            base = plain(input_ids=ids).logits.float()
    adapter_effect = (theirs - base).abs().max().item()
    assert adapter_effect > 0.05
    assert (ours - theirs).abs().max().item() <= 0.1 * adapter_effect + 2e-2


def test_target_experts_false_and_dropout(tmp_path):
    path = save_tiny_moe("mixtral", tmp_path / "mixtral")
    model = attach_lora(qlora.load_model(path, device="cpu", progress=False), r=4, lora_dropout=0.1,
                        gradient_checkpointing=False, target_experts=False)
    assert not any(isinstance(m, ParamWrapper) for m in model.modules())
    assert "expert stacks" not in describe_trainable(model)
    assert model.peft_config["default"].lora_dropout == 0.1
    with pytest.warns(UserWarning, match=r"lora_dropout=0.1 -> 0: the adapter covers expert stacks"):
        model = attach_lora(qlora.load_model(path, device="cpu", progress=False), r=4, lora_dropout=0.1,
                            gradient_checkpointing=False)
    assert model.peft_config["default"].lora_dropout == 0.0
    with pytest.raises(NotImplementedError, match="merging a LoRA adapter into"):
        model.merge_and_unload()


def test_qlora_load_lora_reads_an_expert_adapter_back(tmp_path):
    path = save_tiny_moe("qwen3_moe", tmp_path / "moe")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    model = attach_lora(qlora.load_model(path, device="cpu", progress=False), r=4, lora_dropout=0.0,
                        gradient_checkpointing=False)
    _train(model.train(), ids, steps=2)
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing or unexpected adapter keys
        again = qlora.lora.load_lora(qlora.load_model(path, device="cpu", progress=False), tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
