"""A tiny model, tokenizer and prompt/completion task for trainer tests (built locally, seconds)."""
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny_models import VOCAB, build_model

WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def save_tiny_model_with_tokenizer(directory: Path) -> Path:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    model = build_model("llama", dtype=torch.float32)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_copy_task(path: Path, count: int = 64, seed: int = 0) -> Path:
    """prompt: a few words; completion: the same words reversed."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            words = rng.sample(WORDS, rng.randint(2, 5))
            f.write(json.dumps({"prompt": " ".join(words), "completion": " " + " ".join(reversed(words))}) + "\n")
    return path


def overrides(model_dir: Path, data_file: Path, run_dir: Path, **extra) -> list[str]:
    """Hydra overrides for a seconds-long CPU run on the tiny model."""
    values = {
        "model.name_or_path": str(model_dir),
        "model.dtype": "float32",
        # fp32 compute, which the tests' tolerances are derived for; compute_dtype=auto (the embedded
        # default: bf16 on CPUs with bf16 units) has tests of its own.
        "quantization.compute_dtype": "float32",
        "data.source": str(data_file),
        "data.format._target_": "qlora.data.PromptCompletionFormat",
        "data.max_seq_len": 32,
        "data.eval_fraction": 0.1,
        "trainer.max_steps": 6,
        "trainer.micro_batch_size": 4,
        "trainer.gradient_accumulation_steps": 2,
        "trainer.eval_every": 3,
        "trainer.save_every": 2,
        "trainer.eval_samples": 1,
        "trainer.exact_match_examples": 0,
        "trainer.max_new_tokens": 4,
        "lora.r": 4,
        "lora.dropout": 0.1,
        "hydra.run.dir": str(run_dir),
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]
