"""The training loss: summed next-token cross-entropy over supervised tokens, plain or chunked.

Chunked, the LM head and the loss run through torch.nn.functional.linear_cross_entropy with
chunking options: it computes the head's logits a slice of tokens at a time and keeps only what
the backward needs, so the [tokens, vocab] logits tensor (the largest single allocation with a
128k vocabulary: 4 GiB of fp32 logits at 8k tokens) never exists. It ships with PyTorch, so it
runs on CPU and GPU alike and is tested where the rest of the loop is.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from qlora.data.tokenization import IGNORE_INDEX
from qlora.lora import base_model
from qlora.train.schema import ConfigError

# Config attributes of models whose logits are not the head's plain output (soft-capping, scaling):
# the chunked path cannot apply them between the matmul and the loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class ChunkedLossError(ConfigError):
    """The model cannot use the chunked loss; the message says why and what to set instead."""


def check_chunked_loss(model: nn.Module) -> None:
    """Raise ChunkedLossError unless the chunked path computes the same loss as model(...).logits would."""
    if not hasattr(F, "linear_cross_entropy"):
        raise ChunkedLossError(f"trainer.chunked_loss=true needs torch.nn.functional.linear_cross_entropy, which torch "
                               f"{torch.__version__} lacks: upgrade torch, or set trainer.chunked_loss=false")
    base = base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise ChunkedLossError(f"trainer.chunked_loss=true needs the output head to be a plain nn.Linear, got "
                               f"{type(head).__name__}: keep lm_head out of the LoRA targets and the quantized layers, "
                               "or set trainer.chunked_loss=false")
    config = getattr(base, "config", None)
    if getattr(config, "output_router_logits", False):
        raise ChunkedLossError("trainer.chunked_loss=true skips the model's own head, where transformers adds the "
                               "router's load-balancing loss that this config asks for (output_router_logits): set "
                               "trainer.chunked_loss=false")
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ChunkedLossError(f"trainer.chunked_loss=true cannot apply {name}={value} of this "
                                   f"{getattr(config, 'model_type', 'model')}: set trainer.chunked_loss=false")


def token_loss_sum(model: nn.Module, batch: dict, chunked: bool = False,
                   chunk_size: Optional[int] = None, extra: Optional[dict] = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised positions, and their count.

    Summed rather than averaged so that gradient accumulation can normalize by the supervised
    tokens of the whole optimizer step. chunked: never materialize the logits (see the module
    docstring); chunk_size: tokens per chunk (None: PyTorch's heuristic, a logits chunk about the
    size of the hidden states). extra: receives "router_aux_loss", the mixture-of-experts
    load-balancing loss transformers computes when the model's config sets output_router_logits.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"][:, 1:]
    count = int((labels != IGNORE_INDEX).sum())
    if not chunked:
        output = model(**inputs)
        if extra is not None and getattr(output, "aux_loss", None) is not None:
            extra["router_aux_loss"] = output.aux_loss
        logits = output.logits
        shifted = logits[:, :-1].float()
        loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, count
    base = base_model(model)
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
    head = base.get_output_embeddings()
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(head.weight.dtype)
    options = (torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size, chunking_method=None) if chunk_size
               else torch.nn.LinearCrossEntropyOptions())
    loss = F.linear_cross_entropy(hidden, head.weight, labels.reshape(-1), linear_bias=head.bias, reduction="sum",
                                  ignore_index=IGNORE_INDEX, options=options)
    # The op returns the input dtype: in bf16 the logged sum is rounded to 8 significant bits (the
    # gradient is not). fp32 from here on, for the division by the token count and accumulation.
    return loss.float(), count
