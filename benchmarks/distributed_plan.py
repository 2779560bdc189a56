"""Per-rank memory of a QLoRA run under FSDP2, for model sizes we cannot run here.

    python benchmarks/distributed_plan.py model=llama3_70b gpus=2 gpu_memory_gb=24 seq=2048
    (options: micro_batch=1 lora_r=64 optim_bits=32 reshard=true objective=sft)

Byte counts per element are measured on the real layer types at small size, on this machine:
- a Linear4bit (NF4, double quant, blocksize 64) at two shapes: packed bytes per weight (sharded)
  and the scales/code tables (replicated: FSDP2 shards parameters, the scales are buffers);
- a PEFT LoRA adapter on it (trainable bytes per r x (in + out));
- PagedAdamW's state bytes per trainable parameter (32- or 8-bit);
- one decoder layer of a small Llama (4-bit base, LoRA on every linear, bf16): the bytes autograd
  saves per token, and the peak bytes its backward allocates per token (gradients, temporaries),
  each fitted as a x hidden + b x intermediate over three shapes.
They are scaled to the named architecture. Offload = distributed.cpu_offload (parameter shards,
gradients and optimizer states in host memory) + trainer.activation_offload (layer inputs in
host memory). The published figure (PEFT's FSDP guide) is for Llama-2-70B, batch 2, r=8 and parameter
offload only: `model=llama2_70b micro_batch=2 lora_r=8` plans that setup. Writes
benchmarks/results/distributed_plan.json.

objective=dpo|orpo|simpo (pairs) puts two sequences through the model per example (chosen and
rejected, one concatenated forward), so activations, backward and logits double; DPO adds the
reference forward (no gradients, eval mode): nothing of it is saved, but while it runs one layer's
forward temporaries and the reference logits sit beside everything the policy forward saved.
objective=kto has one sequence per example plus two no-gradient forwards of the mismatched
sequences (policy and reference, for the KL estimate) and the reference forward.
"""
from __future__ import annotations

import os
import sys
import weakref
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _ROOT]  # kernels/ shadowing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from common import print_table, versions, write_results  # noqa: E402

GB = 1e9
# Published architectures (config.json of each model).
MODELS = {
    "llama3_70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
    "llama3_8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "llama2_7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "llama2_70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000),
}
# 70B QLoRA on 2 x 24 GB GPUs, per GPU: PEFT's FSDP guide (docs/source/accelerate/fsdp.md, "Memory
# usage"): Llama-2-70B, FSDP1 through accelerate with fsdp_offload_params (parameters only; the
# activations stay on the GPU), seq 2048 x per-device batch 2, LoRA r=8 on all linear layers, NF4 +
# double quant in bf16 storage, flash attention, gradient checkpointing, AdamW. As read off the GPU
# (CUDA context and the caching allocator's reserve included), not a count of tensors.
PUBLISHED = {"model": "llama2_70b", "gpus": 2, "seq": 2048, "micro_batch": 2, "lora_r": 8,
             "param offload": 19.6, "no offload": 35.6}
CUDA_CONTEXT_GB = 0.5  # CUDA context + allocator slack: not measurable on CPU; a typical figure


def linear_shapes(m: dict) -> list[tuple[int, int]]:
    """(in, out) of the 7 linear layers of one Llama decoder layer."""
    h, i, kv = m["hidden"], m["intermediate"], m["hidden"] * m["kv_heads"] // m["heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


# ---- measurements at small size ---------------------------------------------------------------

def measure_quantized() -> dict:
    """Packed bytes per weight, and the scales as bytes per weight + a fixed part per layer."""
    from qlora.nn import Linear4bit

    points = []
    for out_features, in_features in ((256, 512), (512, 1024)):
        layer = Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16)
        layer.set_weight(torch.randn(out_features, in_features))
        packed = layer.weight.numel() * layer.weight.element_size()
        scales = layer.quantized_weight.nbytes - packed
        points.append((in_features * out_features, packed, scales))
    (n1, p1, s1), (n2, p2, s2) = points
    per_weight = (s2 - s1) / (n2 - n1)
    return {"packed_per_weight": p2 / n2, "scales_per_weight": per_weight, "scales_per_layer": s1 - per_weight * n1}


def _small_llama(hidden: int, intermediate: int, r: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import qlora
    from qlora.lora import attach_lora
    from qlora.models.loading import replace_linear_layers

    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    qconfig = qlora.QuantConfig(compute_dtype=torch.bfloat16)
    for name in replace_linear_layers(model, qconfig):
        model.get_submodule(name).set_weight(dense[name].float())
    return attach_lora(model, r=r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                       gradient_checkpointing=False)


def measure_lora_and_optimizer(r: int, optim_bits: int) -> dict:
    from qlora.optim import PagedAdamW

    model = _small_llama(256, 512, r)
    shapes = linear_shapes(dict(hidden=256, intermediate=512, heads=4, kv_heads=4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = PagedAdamW(trainable, optim_bits=optim_bits, min_8bit_size=0)
    numel = sum(p.numel() for p in trainable)
    return {"lora_bytes_per_r_in_out": lora_bytes / (r * sum(i + o for i, o in shapes)),
            "optimizer_bytes_per_param": optimizer.state_bytes() / numel,
            "grad_bytes_per_param": 4.0}  # fp32 master weights, FSDP2 reduce_dtype fp32


def _saved_bytes_per_token(hidden: int, intermediate: int, seq: int = 128) -> float:
    model = _small_llama(hidden, intermediate, 8)
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(1, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    rotary = model.get_base_model().model.rotary_emb(x, torch.arange(seq)[None])
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen and not isinstance(t, torch.nn.Parameter) and t.requires_grad is not None:
            seen.add(key)
            if t.numel() >= seq:  # per-token tensors (not parameters, not scalars)
                total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=rotary, attention_mask=None)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    return total / seq, params


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops create while it is active and that are still alive, and their peak
    (each storage counted once, freed when its last tensor goes)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.alive:
                    self.alive.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.alive.discard(key)
        self.live -= nbytes


def _backward_bytes_per_token(hidden: int, intermediate: int, seq: int = 128) -> float:
    """Peak bytes the backward of one decoder layer allocates (gradients of its activations and
    temporaries) beyond what existed before it, per token. The saved activations it frees on the
    way are not subtracted, so this errs high."""
    model = _small_llama(hidden, intermediate, 8)
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(1, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    rotary = model.get_base_model().model.rotary_emb(x, torch.arange(seq)[None])
    out = layer(x, position_embeddings=rotary, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.randn_like(out)
    live = _LiveBytes()
    with live:
        out.backward(grad)
    return live.peak / seq


def _fit(measure) -> tuple[float, float]:
    """(a, b) of bytes per token = a * hidden + b * intermediate, least squares over three shapes."""
    rows, values = [], []
    for hidden, intermediate in ((256, 512), (256, 1024), (512, 1024)):
        rows.append([hidden, intermediate])
        values.append(measure(hidden, intermediate))
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                  torch.tensor(values, dtype=torch.float64)[:, None]).solution.flatten()
    return float(solution[0]), float(solution[1])


def measure_activations() -> dict:
    """Saved bytes per token of one decoder layer = a*hidden + b*intermediate (least squares)."""
    rows, values = [], []
    for hidden, intermediate in ((256, 512), (256, 1024), (512, 1024)):
        per_token, _ = _saved_bytes_per_token(hidden, intermediate)
        rows.append([hidden, intermediate])
        values.append(per_token)
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                  torch.tensor(values, dtype=torch.float64)[:, None]).solution.flatten()
    backward = _fit(_backward_bytes_per_token)
    return {"saved_per_token_per_hidden": float(solution[0]), "saved_per_token_per_intermediate": float(solution[1]),
            "backward_per_token_per_hidden": backward[0], "backward_per_token_per_intermediate": backward[1]}


# ---- the plan ----------------------------------------------------------------------------------

# objective -> (sequences through the policy per example, tokens of a no-gradient forward per example
# token at the peak: the reference's, alongside the policy's saved activations). The no-gradient forwards
# run one after the other, so only one is alive at a time.
OBJECTIVES = {"sft": (1, 0), "orpo": (2, 0), "simpo": (2, 0), "dpo": (2, 2), "kto": (1, 1)}


def plan(m: dict, gpus: int, seq: int, micro_batch: int, r: int, measured: dict, reshard: bool = True,
         objective: str = "sft") -> list[dict]:
    q, lo, act = measured["quantized"], measured["lora"], measured["activations"]
    shapes = linear_shapes(m)
    weights_per_layer = sum(i * o for i, o in shapes)
    sequences, reference_sequences = OBJECTIVES[objective]
    layers, tokens, h, vocab = m["layers"], seq * micro_batch * sequences, m["hidden"], m["vocab"]
    packed = layers * weights_per_layer * q["packed_per_weight"]
    scales = layers * (weights_per_layer * q["scales_per_weight"] + 7 * q["scales_per_layer"])
    dense = (2 * vocab * h + (2 * layers + 1) * h) * 2  # bf16 embeddings, head, norms (not quantized)
    lora_params = layers * r * sum(i + o for i, o in shapes)
    lora = lora_params * lo["lora_bytes_per_r_in_out"]  # bytes per element of r x (in + out)
    per_token_layer = (act["saved_per_token_per_hidden"] * h
                       + act["saved_per_token_per_intermediate"] * m["intermediate"])
    checkpointed = layers * tokens * h * 2 + tokens * per_token_layer  # layer inputs + one layer's recompute
    offloaded = 2 * tokens * h * 2 + tokens * per_token_layer  # two layer inputs in flight + the recompute
    logits = tokens * vocab * (2 + 4 + 4)  # bf16 logits, their fp32 copy for the loss, its gradient
    layer_gathered = weights_per_layer * (q["packed_per_weight"] + q["scales_per_weight"]) + r * sum(
        i + o for i, o in shapes) * 2  # packed bytes + bf16 LoRA of one layer
    # Current + prefetched layer, and the root group (embeddings and head, bf16): FSDP2 keeps the root
    # gathered from its forward through the backward. With offload each gathered layer's shards are
    # first copied to the GPU as the all-gather's input.
    gather = (2 if reshard else layers) * layer_gathered + 2 * vocab * h * 2
    gather_inputs = 2 * layer_gathered / gpus
    backward = tokens * (act["backward_per_token_per_hidden"] * h
                         + act["backward_per_token_per_intermediate"] * m["intermediate"])
    # The reference forward saves nothing (no gradients): its peak is one layer's forward temporaries (at
    # most what that layer would save) and its logits with their fp32 copy, reduced to log-probs at once.
    reference_tokens = seq * micro_batch * reference_sequences
    reference = reference_tokens * (per_token_layer + vocab * (2 + 4))
    moved = lambda gb: (gb, 0.0, gb)  # noqa: E731  with offload: shards in host memory (CPUOffloadPolicy)
    stays = lambda gb: (gb, gb, 0.0)  # noqa: E731
    rows = [
        ("quantized base shard (packed, sharded)", *moved(packed / gpus)),
        ("quantization scales (buffers, replicated)", *stays(scales)),
        ("dense embeddings/head/norms shard (bf16)", *moved(dense / gpus)),
        ("LoRA shard (fp32 master)", *moved(lora / gpus)),
        ("optimizer states shard", *moved(lora_params * lo["optimizer_bytes_per_param"] / gpus)),
        ("gradients shard (fp32)", *moved(lora_params * lo["grad_bytes_per_param"] / gpus)),
        ("activations: checkpointed / offloaded", checkpointed, offloaded, checkpointed - offloaded),
        ("backward of one layer (gradients, temporaries)", *stays(backward)),
        ("logits + loss", *stays(logits)),
        ("reference forward (no gradients: one layer + logits)", *stays(reference)),
        ("all-gather buffers (2 layers + embeddings, head)", gather, gather + gather_inputs, 0.0),
        ("CUDA context (assumed)", *stays(CUDA_CONTEXT_GB * GB)),
    ]
    return [{"part": name, "no offload GB": a / GB, "offload GB": b / GB, "host GB (offload)": c / GB}
            for name, a, b, c in rows]


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    name = args.get("model", "llama3_70b")
    if name not in MODELS:
        raise SystemExit(f"model={name} is not one of {', '.join(MODELS)}")
    gpus, memory = int(args.get("gpus", 2)), float(args.get("gpu_memory_gb", 24))
    seq, micro, r = int(args.get("seq", 2048)), int(args.get("micro_batch", 1)), int(args.get("lora_r", 64))
    bits, reshard = int(args.get("optim_bits", 32)), args.get("reshard", "true") == "true"
    objective = args.get("objective", "sft")
    if objective not in OBJECTIVES:
        raise SystemExit(f"objective={objective} is not one of {', '.join(OBJECTIVES)}")
    measured = {"quantized": measure_quantized(), "lora": measure_lora_and_optimizer(8, bits),
                "activations": measure_activations()}
    table = plan(MODELS[name], gpus, seq, micro, r, measured, reshard, objective)
    totals = {k: sum(row[k] for row in table) for k in ("no offload GB", "offload GB", "host GB (offload)")}
    table.append({"part": "total per GPU", **totals})
    print(f"{name} QLoRA (NF4 + double quant, LoRA r={r} on all linear layers, {bits}-bit paged AdamW), "
          f"FSDP2 over {gpus} GPUs of {memory:g} GB, seq {seq} x micro-batch {micro}, gradient checkpointing, "
          f"objective {objective}")
    print_table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in row.items()} for row in table],
                ["part", "no offload GB", "offload GB", "host GB (offload)"])
    for key in ("no offload GB", "offload GB"):
        verdict = "fits" if totals[key] <= memory else "does NOT fit"
        print(f"{key.split(' GB')[0]}: {totals[key]:.1f} GB per GPU of {memory:g} GB -> {verdict}")
    moved_activations = next(row["host GB (offload)"] for row in table if row["part"].startswith("activations"))
    param_offload = totals["offload GB"] + moved_activations
    print(f"parameter offload only (activations kept on the GPU): {param_offload:.1f} GB per GPU")
    same = {k: v for k, v in dict(model=name, gpus=gpus, seq=seq, micro_batch=micro, lora_r=r).items()
            if PUBLISHED[k] != v}
    published = {**PUBLISHED, "plan param offload": param_offload, "plan no offload": totals["no offload GB"]}
    print(f"published ({PUBLISHED['model']}, {PUBLISHED['gpus']} x 24 GB, seq {PUBLISHED['seq']} x batch "
          f"{PUBLISHED['micro_batch']}, r={PUBLISHED['lora_r']}): {PUBLISHED['param offload']} GB per GPU with "
          f"parameter offload, {PUBLISHED['no offload']} GB without"
          + (f" (this plan differs in {', '.join(f'{k}={v}' for k, v in same.items())})" if same else ""))
    print("measured per element at small size:", {k: {kk: round(vv, 4) for kk, vv in v.items()}
                                                   for k, v in measured.items()})
    write_results("distributed_plan" if objective == "sft" else f"distributed_plan_{objective}", {"model": name, "architecture": MODELS[name], "gpus": gpus,
                                       "gpu_memory_gb": memory, "seq": seq, "micro_batch": micro, "lora_r": r,
                                       "optim_bits": bits, "objective": objective, "measured": measured,
                                       "table": table,
                                       "published": published, "versions": versions()})


if __name__ == "__main__":
    main(sys.argv[1:])
