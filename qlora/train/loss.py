"""The training loss: summed next-token cross-entropy over supervised tokens, plain or chunked.

Both forms run the LM head on the supervised positions only. With a completion-only loss those are
a few percent of the tokens (5% on the embedded task), and the head is the widest matrix of a small
model (a fifth of the embedded model's forward), so scoring every position and masking most of it
away afterwards is the single largest waste in its step. The plain form selects the positions with
a forward pre-hook on the head module (torch's extension point), so the model's own forward still
runs as it is: wrappers (DDP, FSDP2), logit soft-capping and scaling, the router loss.

Chunked, the LM head and the loss run through torch.nn.functional.linear_cross_entropy with
chunking options: it computes the head's logits a slice of tokens at a time and keeps only what
the backward needs, so the [tokens, vocab] logits tensor (the largest single allocation with a
128k vocabulary: 4 GiB of fp32 logits at 8k tokens) never exists. It ships with PyTorch, so it
runs on CPU and GPU alike and is tested where the rest of the loop is.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from qlora.data.tokenization import IGNORE_INDEX
from qlora.lora import base_model
from qlora.train.schema import ConfigError

# Model classes whose forward reshaped the head's selected logits (warned once each).
_RESHAPING_MODELS: set[str] = set()

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


def output_head(model: nn.Module) -> Optional[nn.Module]:
    """The module that turns hidden states into logits (LoRA-wrapped if adapted), or None."""
    base = base_model(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, nn.Module) else None


@contextmanager
def head_on_positions(model: nn.Module, keep: torch.Tensor):
    """While active, the output head sees only the hidden states where `keep` ([B, T] bool) is True,
    flattened row-major to [N, hidden], so the model returns logits [N, vocab]. Yields a list that is
    non-empty once the head was called that way; a model that computes its logits without calling
    the head module (a tied-weight F.linear) leaves it empty and returns its usual [B, T, vocab]."""
    head, selected = output_head(model), []

    def select(module, args, kwargs):
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(keep.shape):
            return None  # some other call of the head: left alone
        selected.append(True)
        return (hidden[keep.to(hidden.device)], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(select, with_kwargs=True) if head is not None else None
    try:
        yield selected
    finally:
        if handle is not None:
            handle.remove()


def _forward_scoring(model: nn.Module, inputs: dict, keep: torch.Tensor) -> tuple[object, bool]:
    """model(**inputs) with the head on the `keep` positions: (output, whether its logits are [N, vocab]).
    A model whose forward reshapes the head's output (it raises, or returns another shape) is run
    again scoring every position, and remembered, with one warning, so later steps run once."""
    name = type(base_model(model)).__name__
    if name in _RESHAPING_MODELS:
        return model(**inputs), False
    try:
        with head_on_positions(model, keep) as selected:
            output = model(**inputs)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        if not selected:  # raised before the head: not ours
            raise
        _remember_reshaping(name, f"{type(err).__name__}: {err}")
        return model(**inputs), False
    count = int(keep.sum())
    if selected and (output.logits.dim() != 2 or output.logits.shape[0] != count):
        _remember_reshaping(name, f"logits of shape {tuple(output.logits.shape)} for {count} positions")
        return model(**inputs), False
    return output, bool(selected)


def _remember_reshaping(name: str, what: str) -> None:
    _RESHAPING_MODELS.add(name)
    warnings.warn(f"{name} reshapes its logits after the output head ({what}), so its loss scores every "
                  "position: correct, but slower", stacklevel=4)


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
    supervised = labels != IGNORE_INDEX
    count = int(supervised.sum())
    targets = labels[supervised]
    if not chunked:
        # The logits at position t predict token t + 1: keep those whose next token is supervised.
        keep = torch.zeros(batch["labels"].shape, dtype=torch.bool, device=supervised.device)
        keep[:, :-1] = supervised
        output, selected = _forward_scoring(model, inputs, keep)
        if extra is not None and getattr(output, "aux_loss", None) is not None:
            extra["router_aux_loss"] = output.aux_loss
        logits = output.logits
        if not selected:  # every position was scored
            logits = logits[:, :-1][supervised.to(logits.device)]
        loss = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
        return loss, count
    base = base_model(model)
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
    head = base.get_output_embeddings()
    hidden = hidden[:, :-1][supervised.to(hidden.device)].to(head.weight.dtype)
    options = (torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size, chunking_method=None) if chunk_size
               else torch.nn.LinearCrossEntropyOptions())
    loss = F.linear_cross_entropy(hidden, head.weight, targets.to(hidden.device), linear_bias=head.bias,
                                  reduction="sum", options=options)
    # The op returns the input dtype: in bf16 the logged sum is rounded to 8 significant bits (the
    # gradient is not). fp32 from here on, for the division by the token count and accumulation.
    return loss.float(), count
