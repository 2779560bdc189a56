"""Placing a quantized model over an accelerator and the CPU (or disk), through accelerate.

`load_model(..., device_map=...)` takes what transformers takes: a dict {module name: device} or
"auto" (with `max_memory`), where a device is an accelerator index (0, "cuda:0") or "cpu" / "disk".
As in transformers + bitsandbytes:
- modules mapped to "cpu" or "disk" are not quantized: they stay dense in fp32 (bitsandbytes has no
  CPU kernels worth running there), and only with `llm_int8_enable_fp32_cpu_offload=True`; without
  it such a map (other than all-"cpu") gets transformers' error naming the flag;
- accelerate's `infer_auto_device_map` sizes "auto" on the quantized skeleton (the layers' real
  bytes), and `dispatch_model` attaches its AlignDevicesHooks: offloaded weights are brought to the
  execution device for each forward, inputs and outputs follow.

`device` (load_model's argument) says what an accelerator index means: cuda:<i> by default; with
`device="cpu"` every accelerator placement is the CPU, which is how the tests run the "GPU" part of
a map on a machine without one (the quantized layers there, the fp32 offloaded ones beside them).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from torch import nn

from qlora.errors import OptionError

OFFLOAD_DEVICES = ("cpu", "disk")
FP32_OFFLOAD_ERROR = (
    "Some modules are dispatched on the CPU or the disk. Make sure you have enough GPU RAM to fit the quantized "
    "model. If you want to dispatch the model on the CPU or the disk while keeping these modules in 32-bit, you "
    "need to set `llm_int8_enable_fp32_cpu_offload=True` and pass a custom `device_map` to `from_pretrained`. "
    "Check https://huggingface.co/docs/transformers/main/en/main_classes/quantization#offload-between-cpu-and-gpu "
    "for more details."
)


@dataclasses.dataclass
class OffloadPlan:
    device_map: dict  # module name -> torch.device (accelerator placements resolved) or "cpu" / "disk"
    offloaded: list[str]  # module names mapped to "cpu" or "disk": kept dense in fp32
    main_device: torch.device

    def qconfig_for(self, qconfig):
        """The quantization config with the offloaded modules added to its skip list."""
        qconfig = copy.copy(qconfig)
        qconfig.skip_modules = list(qconfig.skip_modules) + [m for m in self.offloaded if m]
        return qconfig

    def keep_offloaded_in_fp32(self, model: nn.Module) -> None:
        for name in self.offloaded:
            model.get_submodule(name).to(torch.float32)

    def dispatch(self, model: nn.Module, offload_folder: Optional[str]) -> nn.Module:
        from accelerate import dispatch_model

        if "disk" in self.device_map.values() and offload_folder is None:
            raise OptionError("the device_map puts modules on 'disk'; pass offload_folder=<directory> to load_model "
                             "for their weights")
        dispatch_model(model, self.device_map, main_device=self.main_device, offload_dir=offload_folder,
                       force_hooks=True)
        model.hf_device_map = dict(self.device_map)
        return model


def _resolve(value, device: Optional[torch.device], key: str):
    if isinstance(value, str) and value in OFFLOAD_DEVICES:
        return value
    try:
        target = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    except (RuntimeError, TypeError):
        raise OptionError(f"device_map[{key!r}] = {value!r} is not a device: use an accelerator index (0), "
                         "'cuda:<i>', 'cpu' or 'disk'") from None
    if target.type == "cpu":
        return "cpu"
    # An explicit device= stands for the accelerator (device="cpu": the GPU part runs on the CPU).
    return device if device is not None else target


def plan_offload(skeleton: nn.Module, quantized_skeleton: nn.Module, device_map, max_memory, qconfig,
                 device: Optional[torch.device]) -> OffloadPlan:
    """Check and resolve a device_map against the model; "auto" is sized on `quantized_skeleton`."""
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise OptionError(f"device_map={device_map!r}: pass a dict {{module name: device}} or 'auto' "
                             "(with max_memory={0: '20GiB', 'cpu': '60GiB'})")
        from accelerate import infer_auto_device_map

        no_split = list(getattr(quantized_skeleton, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(quantized_skeleton, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=qconfig.compute_dtype)
    elif not isinstance(device_map, dict):
        raise OptionError(f"device_map must be a dict or 'auto', got {type(device_map).__name__}")
    if not device_map:
        raise OptionError("device_map is empty; map at least '' (the whole model) to a device")
    modules = dict(skeleton.named_modules())
    unknown = [name for name in device_map if name not in modules]
    if unknown:
        top = sorted({n.split(".")[0] for n in modules if n})
        raise OptionError(f"device_map names modules the model does not have: {unknown[:5]}; its top-level modules "
                         f"are {top} (use names from model.named_modules())")
    uncovered = [n for n, _ in skeleton.named_parameters()
                 if not any(k == "" or n == k or n.startswith(k + ".") for k in device_map)]
    if uncovered:
        raise OptionError(f"device_map places no device for {uncovered[:5]}"
                         f"{' and %d more' % (len(uncovered) - 5) if len(uncovered) > 5 else ''}; map their "
                         "modules (or a parent of them) too")
    resolved = {name: _resolve(value, device, name) for name, value in device_map.items()}
    # Offload placements are the strings "cpu" / "disk"; accelerator ones are torch.devices (even the
    # CPU standing in for one), so that a map's two parts stay apart.
    values = {v if isinstance(v, str) else "accelerator" for v in resolved.values()}
    offloaded = [name for name, value in resolved.items() if value in OFFLOAD_DEVICES]
    if offloaded and values != {"cpu"} and not getattr(qconfig, "enable_fp32_cpu_offload", False):
        raise OptionError(FP32_OFFLOAD_ERROR)
    if values == {"cpu"}:  # everything on the CPU: nothing is offloaded, the whole model is quantized there
        offloaded = []
    accelerators = [v for v in resolved.values() if v not in OFFLOAD_DEVICES]
    main_device = accelerators[0] if accelerators else torch.device("cpu")
    return OffloadPlan(device_map=resolved, offloaded=offloaded, main_device=torch.device(main_device))


def place_offloaded_adapters(model: nn.Module, init_lora_weights) -> None:
    """PEFT creates a layer's adapter on the device of its base weight. Between forwards, an offloaded
    base weight sits on the meta device (accelerate brings it in for each call), so its adapter would
    be created there, with no storage. Create it on the hook's execution device instead, where the
    layer runs, and initialise it as PEFT would."""
    for module in model.modules():
        hook = getattr(getattr(module, "base_layer", None), "_hf_hook", None)
        if hook is None or not getattr(hook, "offload", False) or not hasattr(module, "lora_A"):
            continue
        for adapter in list(module.lora_A.keys()):
            if not module.lora_A[adapter].weight.is_meta:
                continue
            module.lora_A[adapter].to_empty(device=hook.execution_device)
            module.lora_B[adapter].to_empty(device=hook.execution_device)
            module.reset_lora_parameters(adapter, init_lora_weights)
