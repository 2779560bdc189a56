"""Vision-language models (AutoModelForImageTextToText): the language tower in 4 bits, the vision side
16-bit unless asked; saved checkpoints say so to transformers + bitsandbytes; text-only fine-tuning
through train.py; and the families qlora cannot load are refused in one line."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, LlamaConfig,
                          LlamaForCausalLM)

import qlora
from qlora.errors import UnsupportedError
from qlora.models.families import vision_modules
from qlora.nn import QuantizedLinear
from helpers import rel_err, requires_bnb
from model_families import FAMILIES, LLAMA_LIKE, _qwen2_vl
from test_model_families import save_family

ROOT = Path(__file__).resolve().parents[1]
FP32 = qlora.QuantConfig(compute_dtype=torch.float32)
VLMS = [f for f in FAMILIES if f.auto is AutoModelForImageTextToText]
TOKENS = torch.randint(3, 240, (2, 9), generator=torch.Generator().manual_seed(2))


def quantized_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


@pytest.mark.parametrize("family", VLMS, ids=str)
def test_vision_tower_is_kept_or_quantized_on_request(family, tmp_path):
    directory = save_family(family, tmp_path / family.name)
    kept = qlora.load_model(directory, FP32, device="cpu", dtype=torch.float32, progress=False)
    assert vision_modules(kept) == list(family.dense_modules)
    assert kept.config.quantization_config["llm_int8_skip_modules"] == ["lm_head", *family.dense_modules]
    assert all(n.startswith("model.language_model.") for n in quantized_names(kept))

    quantized = qlora.load_model(directory, FP32, device="cpu", dtype=torch.float32, progress=False,
                                 quantize_vision_tower=True)
    vision_linears = [n for n, m in kept.named_modules() if isinstance(m, nn.Linear)
                      and n.startswith(tuple(p + "." for p in family.dense_modules))]
    assert vision_linears and set(vision_linears) <= set(quantized_names(quantized))
    assert quantized.config.quantization_config["llm_int8_skip_modules"] == ["lm_head"]
    # The vision tower's convolution (patch embedding) stays 16-bit, as in bitsandbytes: not a linear layer.
    assert qlora.memory_footprint(quantized) < qlora.memory_footprint(kept)


def test_saved_vlm_reloads_and_names_its_16bit_modules(tmp_path):
    family = next(f for f in VLMS if f.name == "llava")
    model = qlora.load_model(save_family(family, tmp_path / "src"), FP32, device="cpu", dtype=torch.float32,
                             progress=False)
    saved = qlora.save_model(model, tmp_path / "saved")
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head", *family.dense_modules]
    again = qlora.load_model(saved, device="cpu", dtype=torch.float32, progress=False)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
    with torch.no_grad():
        assert torch.equal(again(input_ids=TOKENS).logits, model(input_ids=TOKENS).logits)


@requires_bnb
def test_transformers_bitsandbytes_loads_our_vlm_with_the_vision_side_dense(tmp_path):
    import bitsandbytes as bnb

    family = next(f for f in VLMS if f.name == "qwen2_vl")
    model = qlora.load_model(save_family(family, tmp_path / "src"), FP32, device="cpu", dtype=torch.float32,
                             progress=False)
    saved = qlora.save_model(model, tmp_path / "saved")
    theirs = AutoModelForImageTextToText.from_pretrained(saved, device_map="cpu", dtype=torch.float32)
    assert isinstance(theirs.model.language_model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert type(theirs.model.visual.blocks[0].mlp.fc1) is nn.Linear
    their_state = theirs.state_dict()
    assert all(torch.equal(v, their_state[k]) for k, v in model.state_dict().items())


# ---- text-only fine-tuning of a vision-language model through train.py ----------------------------

def save_tiny_vlm_with_embedded_tokenizer(directory: Path) -> Path:
    """A tiny Qwen2-VL whose text side reads the embedded tokenizer (4096 tokens); its image/video ids sit
    above that vocabulary, so that no text token is taken for an image placeholder."""
    config = _qwen2_vl()
    config.text_config.vocab_size = 4096 + 8
    config.image_token_id, config.video_token_id, config.vision_start_token_id = 4097, 4098, 4099
    config.vision_end_token_id = 4100
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, key, None)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).to(torch.bfloat16).save_pretrained(directory)
    base = ROOT / "qlora" / "embedded" / "base"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(base / name, directory / name)
    # The chat template with the processor, as Llava and older Qwen2-VL repositories keep it (AutoTokenizer skips it;
    # the embedded task's instruction format needs it, so the run fails without it).
    template = (base / "chat_template.jinja").read_text()
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return directory


@pytest.mark.slow
def test_train_py_fine_tunes_the_language_tower_of_a_vlm(tmp_path):
    from qlora.train import run
    from qlora.train.schema import register

    register()  # the recipes' structured schema, as train.py registers it
    model_dir = save_tiny_vlm_with_embedded_tokenizer(tmp_path / "vlm")
    run_dir = tmp_path / "run"
    # The embedded task (the default data), cut to seconds: 2 steps, one eval batch, one exact-match prompt.
    overrides = {"model.name_or_path": str(model_dir), "model.dtype": "float32", "trainer.max_steps": 2,
                 "trainer.micro_batch_size": 2, "trainer.eval_every": 0, "trainer.save_every": 0,
                 "trainer.eval_batches": 1, "trainer.eval_samples": 1, "trainer.exact_match_examples": 1,
                 "trainer.max_new_tokens": 2, "data.max_seq_len": 64, "lora.r": 4}
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{k}={v}" for k, v in overrides.items()])
    summary = run(cfg, run_dir=run_dir)
    assert summary["steps"] == 2 and summary["final_eval_loss"] > 0 and summary["exact_match_after"] is not None
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    # LoRA on the language tower's layers only: the vision side is 16-bit and frozen.
    from safetensors.torch import load_file

    names = list(load_file(run_dir / "adapter" / "adapter_model.safetensors"))
    assert names and all(".language_model." in n for n in names), names[:3]
    assert adapter["base_model_name_or_path"] == str(model_dir)

    # The export merges into dequant(NF4(W)) of the language tower only (the vision side was 16-bit): the merged
    # Qwen2-VL computes what the 4-bit model with the adapter computes.
    from qlora.export import export_merged
    from qlora.lora import load_lora

    merged = AutoModelForImageTextToText.from_pretrained(export_merged(run_dir, tmp_path / "merged", dtype="float32",
                                                                       progress=False), dtype=torch.float32)
    four_bit = load_lora(qlora.load_model(model_dir, FP32, device="cpu", dtype=torch.float32, progress=False),
                         run_dir / "adapter")
    tokens = torch.randint(0, 4096, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(merged(input_ids=tokens).logits, four_bit(input_ids=tokens).logits) < 1e-5
    vision = "model.visual.blocks.0.mlp.fc1.weight"
    source = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).state_dict()[vision]
    assert torch.equal(merged.state_dict()[vision].bfloat16(), source)  # 16-bit as it was, not dequant(quant(W))


# ---- families qlora cannot load ------------------------------------------------------------------

def test_a_non_causal_family_is_refused_in_one_line(tmp_path):
    config = AutoConfig.for_model("t5", vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    directory = tmp_path / "t5"
    directory.mkdir()
    config.save_pretrained(directory)
    with pytest.raises(UnsupportedError, match=r"^t5 \(T5Config\) is neither a causal LM nor an image-text-to-text") as err:
        qlora.load_model(directory, device="cpu", progress=False)
    assert "\n" not in str(err.value)


class RawMatrixMLP(nn.Module):
    """An MLP whose up projection is a bare Parameter: no layer type qlora (or bitsandbytes) quantizes."""

    def __init__(self, config):
        super().__init__()
        self.up = nn.Parameter(torch.zeros(config.intermediate_size, config.hidden_size))
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(x @ self.up.t()))


class RawMatrixConfig(LlamaConfig):
    model_type = "raw_matrix_llama"


class RawMatrixForCausalLM(LlamaForCausalLM):
    """A family with its own modeling code, registered through transformers' Auto classes."""

    config_class = RawMatrixConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = RawMatrixMLP(config)


AutoConfig.register(RawMatrixConfig.model_type, RawMatrixConfig)
AutoModelForCausalLM.register(RawMatrixConfig, RawMatrixForCausalLM)


def test_a_weight_qlora_cannot_quantize_is_refused_naming_family_and_parameter(tmp_path):
    torch.manual_seed(0)
    RawMatrixForCausalLM(RawMatrixConfig(**LLAMA_LIKE)).save_pretrained(tmp_path / "raw")
    with pytest.raises(UnsupportedError) as err:
        qlora.load_model(tmp_path / "raw", device="cpu", progress=False)
    message = str(err.value)
    assert message.startswith("raw_matrix_llama: model.layers.0.mlp.up [128, 64] is a parameter of RawMatrixMLP, a "
                              "module qlora cannot quantize (and 1 more such parameters)") and "\n" not in message
    # Kept 16-bit on purpose, it loads.
    loaded = qlora.load_model(tmp_path / "raw", qlora.QuantConfig(skip_modules=["lm_head", "mlp"]), device="cpu",
                              progress=False)
    assert loaded.model.layers[0].mlp.up.dtype == torch.bfloat16


def test_convolutions_and_state_space_decays_stay_16bit_by_design():
    from qlora.models.families import left_dense

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(512, 512, kernel_size=4, groups=32)  # [512, 16, 4]: a kernel, not a matrix
            self.A_log = nn.Parameter(torch.zeros(512, 16))  # Mamba's decay: elementwise
            self.mix = nn.Parameter(torch.zeros(128, 128))  # a weight matrix no quantized layer holds

    found, by_design = left_dense(nn.Sequential(Mixer()), skip_modules=[])
    assert [(name, shape) for name, _, shape in found] == [("0.mix", (128, 128))]
    assert by_design == {"convolution kernel": 1, "state-space decay": 1}
    assert left_dense(nn.Sequential(Mixer()), skip_modules=["0"])[0] == []
