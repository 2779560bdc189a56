"""LoftQ initialisation (Li et al. 2023, arXiv:2310.08659) with qlora's own quantizers.

A plain QLoRA run starts from Q(W) + 0: the adapter's B is zero, so the model starts off by the
whole quantization error W - Q(W). LoftQ picks the stored base and the adapter together so that
Q + s * B A is close to W. It alternates, for `iterations` steps, starting from T = W:

    Q = quantize(T)                       # in the recipe's format, bit for bit what the layer stores
    L R = best rank-r approximation of W - dequant(Q)     (truncated SVD, L = U sqrt(S), R = sqrt(S) Vh)
    T = W - L R                           # the residual-corrected weight the next step quantizes

The stored base is the last Q: the quantization of the last residual-corrected weight. The
adapter starts at A = R / sqrt(s), B = L / sqrt(s) with s the layer's LoRA scaling (alpha / r, or
alpha / sqrt(r) with rsLoRA), so the adapter adds exactly L R; it stays a plain PEFT adapter.
PEFT's own LoftQ needs bitsandbytes for its quantizer (and leaves s out of the split); this one
uses the quantized layer's format, so NF4/FP4 with double quant and any blocksize are exact.

Any QuantizedLinear works: the round trip is its weight type's quantize (with the layer's own
options) then dequantize, so every registered format (NF4/FP4 today, int8 and GPTQ as they land)
gets LoftQ unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from qlora.errors import OptionError
from torch import nn

import qlora
from qlora.models.conv1d import as_out_in
from qlora.nn import QuantizedLinear

log = logging.getLogger("qlora.loftq")

REPORT_FILE = "loftq.json"
BASE_DIR = "loftq_base"  # inside a run directory: the LoftQ-quantized base, a bitsandbytes 4-bit checkpoint


class LoftQError(OptionError):
    """LoftQ cannot run as asked; the message names the setting and the fix."""


def quantize_roundtrip(layer: QuantizedLinear, weight: torch.Tensor) -> torch.Tensor:
    """dequant(Q(weight)) in fp32 with the layer's own format and layout, leaving the layer as it is."""
    weight_class = type(layer.quantized_weight)
    return weight_class.quantize(weight, **layer.current_options()).dequantize(torch.float32)


def store(layer: QuantizedLinear, weight: torch.Tensor) -> None:
    """Quantize `weight` into the layer: the same quantizer and settings, so the bytes quantize_roundtrip saw."""
    layer.set_weight(weight)


# ---- the algorithm ------------------------------------------------------------------------------

@dataclasses.dataclass
class Decomposition:
    target: torch.Tensor        # the weight the stored base quantizes (W - L R of the previous step)
    dequantized: torch.Tensor   # dequant(Q(target)), fp32: what the layer computes with
    L: torch.Tensor             # [out, r]
    R: torch.Tensor             # [r, in]
    plain_error: float          # ||W - dequant(Q(W))||_F: plain init (B = 0)
    errors: list[float]         # ||W - dequant(Q_i) - L_i R_i||_F after iteration i = 1..iterations
    weight_norm: float          # ||W||_F


def _low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L [out, rank], R [rank, in] with L R the best rank-`rank` approximation (zero-padded past full rank)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = min(rank, S.numel())
    root = S[:keep].sqrt()
    L = matrix.new_zeros(matrix.shape[0], rank)
    R = matrix.new_zeros(rank, matrix.shape[1])
    L[:, :keep] = U[:, :keep] * root
    R[:keep] = root[:, None] * Vh[:keep]
    return L, R


@torch.no_grad()
def decompose(weight: torch.Tensor, rank: int, iterations: int,
              roundtrip: Callable[[torch.Tensor], torch.Tensor]) -> Decomposition:
    """LoftQ's alternation on one weight; `roundtrip(t)` is dequant(Q(t)) in fp32."""
    if iterations < 1:
        raise LoftQError(f"lora.loftq_iter must be >= 1, got {iterations}")
    if rank < 1:
        raise LoftQError(f"the LoRA rank must be >= 1 for LoftQ, got {rank}")
    W = weight.float()
    target, errors, plain = W, [], None
    for _ in range(iterations):
        dequantized = roundtrip(target)
        residual = W - dequantized
        if plain is None:
            plain = float(torch.linalg.matrix_norm(residual))  # the first target is W: this is plain init's error
        L, R = _low_rank(residual, rank)
        errors.append(float(torch.linalg.matrix_norm(residual - L @ R)))
        if len(errors) < iterations:
            target = W - L @ R
    return Decomposition(target, dequantized, L, R, plain, errors, float(torch.linalg.matrix_norm(W)))


# ---- a whole model --------------------------------------------------------------------------------

@dataclasses.dataclass
class LoftQResult:
    """The adapters' starting points (unscaled L, R per module) and the reconstruction report."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    report: dict

    def apply(self, peft_model: nn.Module, adapter_name: str = "default") -> int:
        """Set lora_A = R / sqrt(s), lora_B = L / sqrt(s) on `peft_model` (after attach_lora); returns the count."""
        from peft.tuners.lora.layer import LoraLayer

        from qlora.lora import base_model

        done = set()
        for name, module in base_model(peft_model).named_modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            if name not in self.factors:
                raise LoftQError(f"LoRA targets {name}, which LoftQ did not initialise (it is not a quantized layer "
                                 "of a format LoftQ knows); drop it from lora.target_modules or use lora.init=default")
            L, R = self.factors[name]
            root = math.sqrt(module.scaling[adapter_name])
            a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            with torch.no_grad():
                a.copy_((R / root).to(a.device, a.dtype))
                b.copy_((L / root).to(b.device, b.dtype))
            done.add(name)
        missing = sorted(set(self.factors) - done)
        if missing:
            raise LoftQError(f"LoftQ initialised {missing[:4]} but the model has no LoRA adapter "
                             f"{adapter_name!r} there; attach_lora with the same target_modules first")
        return len(done)


def _matches(name: str, targets) -> bool:
    """PEFT's target rule: a string is a full-match regex; a list entry matches a name or a name suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def loftq_model(model: nn.Module, dense_weight: Callable[[str], torch.Tensor], *, rank: int, iterations: int,
                target_modules="all-linear", progress: bool = False) -> LoftQResult:
    """LoftQ on every quantized target layer of `model` (before LoRA is attached).

    dense_weight(name): the original weight of the linear module `name` as its checkpoint holds it (e.g.
    read from the 16-bit checkpoint with `checkpoint_weights`): [out, in], or [in, out] for a layer that
    replaced transformers' Conv1D (transposed here, as load_model does). Each layer's stored weight is replaced by the
    quantization of its last residual-corrected weight.
    """
    from tqdm.auto import tqdm

    from qlora.lora import resolve_target_modules

    targets = resolve_target_modules(model, target_modules)
    layers = [(n, m) for n, m in model.named_modules() if _matches(n, targets) and isinstance(m, QuantizedLinear)]
    if not layers:
        raise LoftQError("lora.init=loftq found no quantized layer among the LoRA targets: LoftQ corrects the "
                         "quantization error, so it needs a quantized base (quantization=nf4 or fp4)")
    factors, per_layer = {}, {}
    sums = {"plain": 0.0, "loftq": [0.0] * iterations, "weight": 0.0}
    for name, layer in tqdm(layers, desc="LoftQ", unit="layer", disable=not progress):
        device = next(layer.buffers()).device
        weight = as_out_in(layer, dense_weight(name)).to(device)  # a Conv1D's checkpoint holds [in, out]
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise LoftQError(f"{name}: the 16-bit weight has shape {list(weight.shape)}, the layer is "
                             f"[{layer.out_features}, {layer.in_features}]; the checkpoint does not match the model")
        result = decompose(weight, rank, iterations, lambda t, layer=layer: quantize_roundtrip(layer, t))
        store(layer, result.target)
        factors[name] = (result.L.cpu(), result.R.cpu())
        per_layer[name] = {"plain": result.plain_error / result.weight_norm,
                           "loftq": [e / result.weight_norm for e in result.errors]}
        sums["plain"] += result.plain_error ** 2
        sums["weight"] += result.weight_norm ** 2
        for i, error in enumerate(result.errors):
            sums["loftq"][i] += error ** 2
    total = math.sqrt(sums["weight"])
    report = {
        "iterations": iterations, "rank": rank, "layers": len(layers),
        # ||W - W_hat||_F / ||W||_F over all LoftQ layers together; plain init is Q(W) with B = 0.
        "relative_error_plain": math.sqrt(sums["plain"]) / total,
        "relative_error_loftq": [math.sqrt(s) / total for s in sums["loftq"]],
        "per_layer": per_layer,
    }
    return LoftQResult(factors, report)


class checkpoint_weights:
    """dense_weight(name) for `loftq_model`: reads one tensor at a time from a 16-bit checkpoint.

    Use as a context manager: `with checkpoint_weights(path) as weight: loftq_model(model, weight, ...)`.
    """

    def __init__(self, name_or_path: str, revision: Optional[str] = None):
        from qlora.models.checkpoint import ShardReader, resolve_checkpoint

        directory = resolve_checkpoint(name_or_path, revision)
        config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
        if config.get("quantization_config"):
            raise LoftQError(f"lora.init=loftq needs the 16-bit weights W, but {name_or_path} is a quantized "
                             "checkpoint; pass the unquantized checkpoint as model.name_or_path, or use "
                             "lora.init=default")
        self.source = name_or_path
        self.reader = ShardReader(directory)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.reader.close()
        return False

    def __call__(self, name: str) -> torch.Tensor:
        key = f"{name}.weight"
        head, _, rest = key.partition(".")
        for candidate in (key, rest, f"model.{key}"):  # with or without the base-model prefix
            if candidate and candidate in self.reader:
                return self.reader.get(candidate)
        raise LoftQError(f"the checkpoint {self.source} has no tensor {key!r} for LoftQ; it does not match the model")


def format_report(report: dict) -> str:
    errors = ", ".join(f"{e:.4f}" for e in report["relative_error_loftq"])
    return (f"LoftQ over {report['layers']} layers, rank {report['rank']}: relative reconstruction error "
            f"||W - (Q + BA)||/||W|| {report['relative_error_plain']:.4f} with plain init, {errors} after "
            f"iterations 1..{report['iterations']}")


# ---- training-run glue -------------------------------------------------------------------------------

def initialize_for_run(cfg, model: nn.Module, model_path: str, run_dir: Path, tokenizer=None) -> LoftQResult:
    """LoftQ as a recipe asks (lora.r, lora.target_modules, lora.loftq_iter); before attach_lora.

    Writes `loftq.json` (the reconstruction errors) and `loftq_base/` (the LoftQ-quantized base as
    a bitsandbytes 4-bit checkpoint: export, generate and eval of the run use it as the base,
    because the adapter was trained against it, not against Q(W)).
    """
    lora = cfg.lora
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    with checkpoint_weights(model_path, cfg.model.revision) as weight:
        result = loftq_model(model, weight, rank=lora.r, iterations=lora.loftq_iter, target_modules=target,
                             progress=True)
    log.info(format_report(result.report))
    run_dir = Path(run_dir)
    (run_dir / REPORT_FILE).write_text(json.dumps(result.report, indent=2) + "\n")
    qlora.save_model(model, run_dir / BASE_DIR, tokenizer=tokenizer, overwrite=True)
    return result


def run_base_dir(run_dir: Path) -> Optional[Path]:
    """The LoftQ base saved by a run, or None for a run that used plain init."""
    path = Path(run_dir) / BASE_DIR
    return path if (path / "config.json").is_file() else None


__all__ = ["BASE_DIR", "Decomposition", "LoftQError", "LoftQResult", "checkpoint_weights", "decompose", "format_report",
           "initialize_for_run", "loftq_model", "quantize_roundtrip", "run_base_dir", "store"]
