"""GPTQ over a whole causal LM: calibration data, then the decoder blocks one by one.

1. Calibration text (a list of strings, a local .txt/.json/.jsonl file, or a Hub dataset name) is
   tokenized, joined with EOS and cut into samples of model_seqlen tokens (at most
   max_calibration_samples of them).
2. The inputs of the first block are captured (a pre-hook that stops the forward there).
3. Per block: its linear layers are grouped by the tensor they read (q/k/v share one input; gate/up
   another). With true_sequential each group in turn collects its Hessians from a forward of the
   block in which the earlier groups are already quantized; otherwise one forward collects them all.
   Each layer is solved (gptq_solver), its dense weight replaced by dequant(Q) for what follows, and
   the block's outputs on all samples become the next block's inputs (cache_block_outputs).
Only the block being quantized and the cached activations live on `device`; the rest stays where
the model is (host memory).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from qlora.errors import OptionError
from qlora.nn.linear_gptq import LinearGPTQ
from qlora.quant.gptq.config import GPTQQuantConfig
from qlora.quant.gptq.solver import HessianAccumulator, gptq_quantize
from qlora.quant.gptq.weight import group_params, quantize_to_grid

logger = logging.getLogger(__name__)
HUB_DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
                "c4": ("allenai/c4", "en", "train", "text")}
DEFAULT_SEQLEN = 2048


class _StopForward(Exception):
    pass


def calibration_texts(dataset) -> list[str]:
    """The calibration set as a list of strings (see the module docstring)."""
    if dataset is None:
        raise OptionError("GPTQ needs calibration data: pass dataset=[\"text\", ...], a local .txt/.jsonl file, or a "
                         "Hub dataset name such as 'wikitext2'")
    if isinstance(dataset, (list, tuple)):
        texts = [t for t in dataset if isinstance(t, str) and t.strip()]
        if len(texts) != len(dataset) and not texts:
            raise OptionError("the GPTQ calibration dataset has no non-empty strings; pass a list of texts")
    elif isinstance(dataset, (str, Path)) and Path(dataset).expanduser().is_file():
        texts = _read_text_file(Path(dataset).expanduser())
    elif isinstance(dataset, str):
        texts = _hub_texts(dataset)
    else:
        raise OptionError(f"GPTQ dataset must be a list of strings, a file path or a Hub dataset name, got {type(dataset).__name__}")
    if not texts:
        raise OptionError(f"the GPTQ calibration dataset {_describe(dataset)} is empty; give it some text")
    return texts


def _describe(dataset) -> str:
    return repr(dataset) if isinstance(dataset, (str, Path)) else f"({type(dataset).__name__} of {len(dataset)})"


def _read_text_file(path: Path) -> list[str]:
    if path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(path.read_text())
        texts = []
        for row in rows:
            text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
            if text is None:
                raise OptionError(f"{path}: calibration rows must be strings or objects with a 'text' field, got {row!r:.80}")
            texts.append(text)
        return [t for t in texts if t.strip()]
    return [p for p in path.read_text().split("\n\n") if p.strip()]


def _hub_texts(name: str) -> list[str]:
    import os

    path, config, split, column = HUB_DATASETS.get(name, (name, None, "train", "text"))
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise OptionError(f"GPTQ dataset {name!r} is a Hub dataset but the Hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1); "
                         "pass a list of strings or a local .txt/.jsonl file instead")
    from datasets import load_dataset

    try:
        rows = load_dataset(path, config, split=split, streaming=True)
        return [r[column] for r, _ in zip(rows, range(5000)) if r[column].strip()]
    except Exception as err:  # datasets raises many types for "cannot reach it"; all mean the same here
        raise OptionError(f"could not load GPTQ calibration dataset {name!r} from the Hub ({type(err).__name__}: "
                         f"{str(err)[:200]}); check the name and the network, or pass a list of strings or a local "
                         "file") from err


def calibration_samples(texts: list[str], tokenizer, seqlen: int, max_samples: int) -> list[torch.Tensor]:
    """Token id tensors [1, seqlen] cut from the texts joined with EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= seqlen * max_samples:
            break
    if len(ids) < seqlen:
        raise OptionError(f"the GPTQ calibration text has {len(ids)} tokens, fewer than model_seqlen={seqlen}; give "
                         "more text or a smaller model_seqlen")
    count = min(len(ids) // seqlen, max_samples)
    return [torch.tensor(ids[i * seqlen:(i + 1) * seqlen]).unsqueeze(0) for i in range(count)]


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """1/2 tr(dW H dW^T): the layer's squared output error on the calibration inputs (H = 2 X X^T / n),
    the quantity GPTQ's loss accumulates."""
    delta = delta.detach().float()  # a figure for the log: no graph (the layer's weight may require grad)
    return 0.5 * float((delta @ hessian.float().to(delta.device) * delta).sum())


def round_to_nearest_error(weight: torch.Tensor, hessian: torch.Tensor, qconfig: GPTQQuantConfig) -> float:
    """output_error of the same weight rounded to nearest on the same grid (bits, group size, symmetry,
    no act-order): what GPTQ's error is measured against in its log line."""
    w = weight.detach().float()
    size = w.shape[1] if qconfig.group_size == -1 else qconfig.group_size
    deq = torch.empty_like(w)
    for start in range(0, w.shape[1], size):
        cols = w[:, start:start + size]
        scale, zero = group_params(cols, qconfig.bits, qconfig.sym)
        deq[:, start:start + size] = scale[:, None] * (quantize_to_grid(cols, scale[:, None], zero[:, None], qconfig.bits)
                                                       - zero[:, None])
    return output_error(w - deq, hessian)


def find_blocks(model: nn.Module, name: Optional[str]) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: `name` (block_name_to_quantize) or the largest ModuleList of the model."""
    if name:
        try:
            blocks = model.get_submodule(name)
        except AttributeError:
            raise OptionError(f"block_name_to_quantize={name!r} is not a module of {type(model).__name__}") from None
        return name, blocks
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise OptionError(f"{type(model).__name__} has no list of decoder blocks; set block_name_to_quantize")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _linear_groups(block: nn.Module, sample: tuple, wanted) -> list[list[str]]:
    """The block's linear layers in execution order, grouped by the input tensor they share."""
    # The inputs themselves are kept until the grouping is done: an input freed during the forward
    # (o_proj's, before gate/up run) would let a later tensor take its id() and join its group.
    order: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: order.append((name, args[0])))
             for n, m in block.named_modules() if isinstance(m, nn.Linear) and wanted(n)]
    try:
        with torch.no_grad():
            _run_block(block, *sample)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    by_input: dict[int, list[str]] = {}
    for name, tensor in order:
        key = id(tensor)
        if name in (n for g in groups for n in g):
            continue
        if key not in by_input:
            by_input[key] = []
            groups.append(by_input[key])
        by_input[key].append(name)
    return groups


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    return value


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, samples, device) -> list[tuple]:
    """(hidden states, keyword arguments) each sample brings to the first block."""
    captured = []

    def stop(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append((hidden.detach(), _move(kwargs, device)))
        raise _StopForward

    hook = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in samples:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        hook.remove()
    return captured


def quantize_model_gptq(model: nn.Module, qconfig: GPTQQuantConfig, tokenizer, device=None,
                        progress: bool = True) -> dict[str, float]:
    """GPTQ-quantize the model's decoder blocks in place (their nn.Linear become LinearGPTQ);
    returns each layer's loss. The model's non-block modules must be on `device`."""
    device = torch.device(device or next(model.parameters()).device)
    seqlen = qconfig.model_seqlen or min(DEFAULT_SEQLEN, getattr(model.config, "max_position_embeddings", DEFAULT_SEQLEN))
    samples = calibration_samples(calibration_texts(qconfig.dataset), tokenizer, int(seqlen),
                                  qconfig.max_calibration_samples)
    block_name, blocks = find_blocks(model, qconfig.block_name_to_quantize)
    inputs = capture_block_inputs(model, blocks, samples, device)
    losses: dict[str, float] = {}
    total = sum(1 for b in blocks for n, m in b.named_modules() if isinstance(m, nn.Linear) and qconfig.quantizes(n))
    bar = tqdm(total=total, desc="GPTQ", unit="layer", disable=not progress)
    for index, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        groups = _linear_groups(block, inputs[0], qconfig.quantizes)
        if not qconfig.true_sequential:
            groups = [[n for g in groups for n in g]]
        solved = {}
        for group in groups:
            accumulators = {n: HessianAccumulator(block.get_submodule(n).in_features, device) for n in group}
            hooks = [block.get_submodule(n).register_forward_pre_hook(
                lambda mod, args, acc=accumulators[n]: acc.add(args[0])) for n in group]
            try:
                with torch.no_grad():
                    for sample in inputs:
                        _run_block(block, *sample)
            finally:
                for h in hooks:
                    h.remove()
            for name in group:
                linear = block.get_submodule(name)
                full_name = f"{block_name}.{index}.{name}"
                result = gptq_quantize(linear.weight, accumulators[name].hessian, qconfig.bits, qconfig.group_size,
                                       qconfig.sym, qconfig.desc_act, qconfig.static_groups, qconfig.damp_percent,
                                       checkpoint_format=qconfig.checkpoint_format, where=full_name)
                hessian = accumulators[name].hessian  # undamped: the output error itself, for both
                energy = output_error(linear.weight, hessian)  # the output's own squared size
                error = output_error(linear.weight - result.dequantized.to(linear.weight.device), hessian)
                rtn = round_to_nearest_error(linear.weight, hessian, qconfig)
                with torch.no_grad():  # later groups and blocks see the quantized layer
                    linear.weight.copy_(result.dequantized.to(linear.weight.dtype))
                solved[name] = result
                losses[full_name] = result.loss
                bar.set_postfix_str(f"{full_name} err={result.loss:.4g} ({error / max(rtn, 1e-30):.2f}x rtn)")
                bar.update()
                # For scale: the relative RMS error of the layer's outputs, and GPTQ's error over rounding to
                # nearest on the same grid. Both are in-sample (the calibration inputs): below 1 is GPTQ doing
                # its job, and with few calibration tokens it can sit far below 1 (0.13-0.40 on the embedded
                # model with 8 x 64 tokens); held-out, round-to-nearest's error is 1.35x GPTQ's at 4 bits, g128
                # (docs/results.md). Near or above 1, the calibration text is too small
                # or unlike what the layer sees.
                logger.info("GPTQ %s: error %.6g (damp_percent %g); %.2f%% relative output error on the calibration "
                            "data, %.2fx round-to-nearest's", full_name, result.loss, result.damp_percent,
                            100 * (error / energy) ** 0.5 if energy > 0 else 0.0, error / max(rtn, 1e-30))
            del accumulators
        with torch.no_grad():
            inputs = [(_run_block(block, *sample), sample[1]) for sample in inputs]
        for name, result in solved.items():
            linear = block.get_submodule(name)
            layer = LinearGPTQ(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               compute_dtype=qconfig.compute_dtype, device="meta", **qconfig.weight_options())
            layer.hold(result.weight.to(device), None if linear.bias is None else linear.bias.detach())
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, layer)
        block.to(home)
    bar.close()
    return losses


def load_and_quantize(directory: Path, qconfig: GPTQQuantConfig, device: torch.device, dtype: torch.dtype,
                      trust_remote_code: bool = False, attn_implementation: Optional[str] = None,
                      progress: bool = True) -> nn.Module:
    """A dense checkpoint loaded (in host memory), GPTQ-quantized block by block on `device`.

    Calibration runs in fp32 on CPU (bf16 matmuls there are slow and round the activations the
    Hessians are built from) and in the checkpoint's own 16-bit dtype on a GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calibration_dtype = torch.float32 if device.type == "cpu" else dtype
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=calibration_dtype, trust_remote_code=trust_remote_code,
                                                 **options)
    tokenizer = qconfig.tokenizer
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer or directory, trust_remote_code=trust_remote_code)
    block_name, _ = find_blocks(model, qconfig.block_name_to_quantize)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(block_name + "."):  # embeddings, final norm, head, rotary tables: on device now
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            target = module._parameters if attr in module._parameters else module._buffers
            moved = tensor.data.to(device)
            target[attr] = nn.Parameter(moved, requires_grad=False) if isinstance(tensor, nn.Parameter) else moved
    quantize_model_gptq(model, qconfig, tokenizer, device, progress)
    model.to(device=device, dtype=dtype)  # LinearGPTQ moves its packed tensors but never casts them
    model.requires_grad_(False)
    return model
