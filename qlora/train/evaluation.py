"""Evaluation during training: held-out loss and perplexity, generated samples, exact match."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch

from qlora.nn.experts_interface import generation_options
from qlora.train.loss import token_loss_sum


@torch.no_grad()
def evaluate_loss(model, loader, max_batches: int = 0, autocast=nullcontext, chunked: bool = False,
                  chunk_size: Optional[int] = None) -> dict:
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        with autocast():
            loss, count = token_loss_sum(model, batch, chunked, chunk_size)
        total += loss.item()
        tokens += count
    model.train(was_training)
    mean = total / max(tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": tokens}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches), without the prompt."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    outputs = []
    try:
        device = next(p for p in model.parameters()).device
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=True).to(device)
            generated = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **generation_options(model),
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int,
                batch_size: int = 16) -> tuple[float, list[dict]]:
    """Fraction of examples whose greedy completion equals the reference (whitespace-trimmed)."""
    if not examples:
        return 0.0, []
    predictions = generate(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens, batch_size)
    rows = [{"prompt": e["prompt"], "reference": e["completion"].strip(), "generated": p.strip()}
            for e, p in zip(examples, predictions)]
    hits = sum(r["generated"] == r["reference"] for r in rows)
    return hits / len(rows), rows
