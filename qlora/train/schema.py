"""The structured schema of a run's config: every field, its type, default and meaning.

Hydra validates the composed recipe against these dataclasses (unknown keys and wrongly typed
values fail at composition, naming the key); `validate()` adds the range checks Hydra cannot
express. Optimizer, scheduler and data format are `_target_` nodes: any importable class works.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from qlora.errors import UserError


@dataclass
class ModelConfig:
    # Local checkpoint directory, Hub repo id, or "embedded" (the small model shipped in qlora.embedded).
    name_or_path: str = "embedded"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # dtype of the layers that stay dense (embeddings, norms, head); null = the compute dtype.
    dtype: Optional[str] = None
    # transformers attention implementation ("sdpa", "eager", "flash_attention_2"); null = default.
    attn_implementation: Optional[str] = None
    # A vision-language model's vision encoder and projector are kept 16-bit; true quantizes their linear layers too.
    quantize_vision_tower: bool = False
    # A PEFT adapter directory to start from (e.g. an SFT run's adapter/): trained on instead of a fresh
    # adapter (the lora.* shape options are then the adapter's own). For DPO and KTO it is also the
    # reference policy, loaded a second time, frozen.
    adapter: Optional[str] = None


@dataclass
class QuantizationConfig:
    quant_type: str = "nf4"  # "nf4", "fp4", "int8" (LLM.int8, bitsandbytes' 8-bit format), or "none": the 16-bit LoRA baseline (base linears in compute_dtype)
    double_quant: bool = True  # also quantize the absmax constants (4.127 bits/param for NF4)
    # dtype the quantized layers compute in; "auto": bfloat16 where the device multiplies bf16 natively
    # (CUDA 8.0+, a CPU with AVX512-BF16 or AMX), float32 elsewhere (qlora.train.recipes.native_compute_dtype)
    compute_dtype: str = "bfloat16"
    blocksize: int = 64  # elements per absmax block, a power of two in [32, 4096]
    quant_storage: str = "uint8"  # dtype the packed bytes are stored as (bf16/fp16/fp32 for FSDP)
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])  # kept dense
    # int8 only: activations with |x| >= threshold are multiplied in 16-bit (LLM.int8's outlier columns); 0 = off.
    threshold: float = 6.0
    method: str = "bitsandbytes"  # "bitsandbytes" (the NF4/FP4 keys above) or "gptq" (the keys of `gptq`)
    gptq: dict[str, Any] = field(default_factory=dict)  # qlora.models.gptq_base: bits, group_size, dataset, ...


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # "all-linear", or a list of module names such as [q_proj, v_proj].
    target_modules: Any = "all-linear"
    # On a mixture-of-experts model, also adapt every expert stack (PEFT's target_parameters).
    target_experts: bool = True
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA
    bias: str = "none"  # "none", "all" or "lora_only"
    init_lora_weights: Any = True  # True, False, "gaussian", "pissa", ... as peft.LoraConfig takes
    # "default": B = 0 (the model starts at the quantized base); "loftq": base and adapter chosen together
    # so that Q + BA is close to the 16-bit W (qlora.loftq), alternating loftq_iter times.
    init: str = "default"
    loftq_iter: int = 1


@dataclass
class DataConfig:
    # A local .json/.jsonl/.csv/.parquet file or folder, a Hub dataset name, or "embedded".
    source: str = "embedded"
    split: str = "train"
    eval_source: Optional[str] = None  # held-out file/name; null = split eval_fraction off the train set
    eval_fraction: float = 0.05
    # How a record becomes (prompt, completion): a _target_ node, e.g. qlora.data.InstructionFormat.
    format: Any = field(default_factory=lambda: {"_target_": "qlora.data.InstructionFormat"})
    max_seq_len: int = 512
    truncation: bool = True  # false: an example longer than max_seq_len is an error
    completion_only_loss: bool = True  # no loss on prompt tokens
    packing: bool = False  # several examples per sequence; attention never crosses them
    # Micro-batches of examples of about one length (less padding), drawn from random mega-batches of
    # 50 micro-batches, longest first: transformers' group_by_length (qlora.data.order).
    group_by_length: bool = False
    seed: int = 0


@dataclass
class TrainerConfig:
    run_name: str = "default"  # runs go to outputs/<run_name>/<timestamp>/
    max_steps: int = 100  # optimizer steps
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (autocast through accelerate)
    gradient_checkpointing: bool = False  # non-reentrant
    # Checkpointed decoder layers' inputs go to pinned host memory on a side stream and come back one
    # layer ahead of their recompute (needs gradient_checkpointing; CUDA only: nothing to do on CPU).
    activation_offload: bool = False
    # LM head + loss a chunk of tokens at a time: the [tokens, vocab] logits are never materialized.
    chunked_loss: bool = False
    loss_chunk_size: Optional[int] = None  # tokens per chunk; null = PyTorch's heuristic
    eval_every: int = 50  # steps; 0 = only at the end
    eval_batches: int = 0  # eval batches per evaluation; 0 = the whole eval set
    eval_samples: int = 3  # generated samples written to the log at each evaluation
    exact_match_examples: int = 0  # held-out prompts scored by exact match before and after; 0 = off
    max_new_tokens: int = 48
    generation_batch_size: int = 16  # prompts generated at once for samples and exact match
    save_every: int = 50  # steps; 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    # false, true (newest complete checkpoint of an earlier run with this run_name) or a checkpoint path.
    resume: Any = False
    seed: int = 0
    device: Optional[str] = None  # null = cuda if available, else cpu
    log_every: int = 1
    num_workers: int = 0
    # A step whose gradients are not finite is never applied. "stop": end the run naming the newest
    # good checkpoint; "skip": drop the step and go on, at most max_nonfinite_skips times in a row.
    nonfinite: str = "stop"
    max_nonfinite_skips: int = 10


@dataclass
class LoggerConfig:
    backend: str = "jsonl"  # "jsonl" (always written) or "wandb" (jsonl plus wandb)
    project: str = "qlora"
    entity: Optional[str] = None
    # wandb mode: "auto" = online with an API key (WANDB_API_KEY or a login), else offline.
    mode: str = "auto"
    tags: list[str] = field(default_factory=list)


@dataclass
class DistributedConfig:
    # "none" (one process), "ddp" (LoRA gradients all-reduced, the base held whole on every rank) or
    # "fsdp2" (fully_shard: base, LoRA weights, gradients and optimizer states sharded). ddp and fsdp2
    # need a launcher: torchrun --nproc_per_node=N train.py ... (or accelerate launch --num_processes N).
    strategy: str = "none"
    reshard_after_forward: bool = True  # fsdp2: free gathered layers after the forward, gather again in backward
    hybrid_shard: bool = False  # fsdp2: shard within a node, replicate across nodes (HSDP)
    cpu_offload: bool = False  # fsdp2: keep parameter shards (and their optimizer states) in host memory
    timeout_s: float = 600.0  # longest wait of any collective; a dead peer fails the others after this
    # fsdp2: rank 0 reads and quantizes the checkpoint one tensor at a time and sends each rank only its
    # shard (the others never read it): host RAM per rank is its shard plus one streaming tensor, not
    # the whole 4-bit model N times over (a 70B on 8 ranks of one 128 GB host).
    low_memory_load: bool = False


@dataclass
class ObjectiveConfig:
    # "sft" (next-token loss), "dpo", "orpo", "simpo" or "kto"; recipes/objective/ holds each one's
    # published defaults, documented in docs/preference.md.
    name: str = "sft"
    beta: float = 0.1  # DPO/KTO: strength of the pull to the reference; SimPO: reward scale
    loss_type: str = "sigmoid"  # DPO: "sigmoid" (DPO), "ipo" or "hinge"
    label_smoothing: float = 0.0  # DPO sigmoid and SimPO: probability a preference is flipped, in [0, 0.5)
    orpo_lambda: float = 0.1  # ORPO: weight of the odds-ratio term beside the chosen NLL
    gamma: float = 0.5  # SimPO: target reward margin
    # DPO and SimPO: weight of the chosen answers' NLL (per chosen token) added to the loss; RPO's alpha
    # (Pang et al. 2024), SimPO's sft_weight, TRL's loss_type=[sigmoid, sft]. 0 = the published losses.
    sft_weight: float = 0.0
    desirable_weight: float = 1.0  # KTO: weight of desirable examples' losses
    undesirable_weight: float = 1.0  # KTO: weight of undesirable examples' losses
    # DPO/KTO: reference log-probs computed once over the training set before the first step and kept
    # beside the checkpoints (a resumed run reads them back) instead of a reference forward every step.
    precompute_reference: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    quantization: QuantizationConfig = MISSING
    lora: LoraConfig = MISSING
    data: DataConfig = MISSING
    optimizer: Any = MISSING  # _target_ + _partial_: built with the trainable parameters
    scheduler: Any = MISSING  # _target_ + _partial_: built with the optimizer and the step count
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


def register() -> None:
    """Make the schema known to Hydra (config.yaml lists `run_schema` first in its defaults)."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)


class ConfigError(UserError, ValueError):
    """A recipe value that is out of range; the message names the key and the fix."""
