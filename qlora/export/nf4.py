"""Re-quantizing a merged model to NF4 (qlora.save_model's layout) and measuring what that costs.

Re-quantizing W' = dequant(NF4(W)) + delta adds a second rounding error on top of the merge: the
export reports it as the logit difference between the merged 16-bit model and its 4-bit copy on
a few fixed token sequences, both computed in fp32 so that only the quantization shows.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qlora.quant.nf4.config import QuantConfig
from qlora.models import load_model, save_model

# Fixed sequences: deterministic token ids spread over the vocabulary (no tokenizer needed).
_SEQUENCES = 4
_SEQUENCE_LENGTH = 16


def probe_tokens(vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (_SEQUENCES, _SEQUENCE_LENGTH), generator=generator)


def write_nf4(merged_dir: Path, directory: Path, qconfig: QuantConfig, dense_dtype: torch.dtype,
              progress: bool = True) -> None:
    """Quantize the merged checkpoint with `qconfig` through load_model and write it with save_model."""
    model = load_model(merged_dir, qconfig, device="cpu", dtype=dense_dtype, progress=progress)
    record = json.loads((merged_dir / "config.json").read_text()).get("qlora_merge", {})
    model.config.qlora_merge = record
    save_model(model, directory, overwrite=True)
    if (merged_dir / "generation_config.json").is_file():
        shutil.copy2(merged_dir / "generation_config.json", directory / "generation_config.json")


@torch.no_grad()
def added_logit_error(merged_dir: Path, nf4_dir: Path) -> dict:
    """max / mean |logits(nf4) - logits(merged)| over the probe sequences, both in fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokens = probe_tokens(dense.config.vocab_size)
    reference = dense(input_ids=tokens).logits
    del dense
    fp32 = QuantConfig(compute_dtype=torch.float32)  # a pre-quantized checkpoint takes only the compute dtype
    quantized = load_model(nf4_dir, fp32, device="cpu", dtype=torch.float32, progress=False)
    logits = quantized(input_ids=tokens).logits
    diff = (logits - reference).abs()
    return {
        "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
        "reference_logit_std": float(reference.std()),
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        "sequences": _SEQUENCES, "sequence_length": _SEQUENCE_LENGTH,
    }
