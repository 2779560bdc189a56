"""GPTQModel's side of tests/test_gptq_oracle.py, run in a child process.

Importing gptqmodel patches transformers (its GPTQ quantizer and config mappings) for the rest of
the process, so the test suite never imports it: each operation runs here, in a fresh interpreter,
and exchanges tensors through files.

    python gptq_oracle_worker.py '[{"op": "quantize", "dense": DIR, "out": DIR, "calibration": FILE.pt,
                                    "bits": 4, "group_size": 32, "desc_act": false, "damp_percent": 0.1},
                                   {"op": "forward", "checkpoint": DIR, "input_ids": FILE.pt, "out": FILE.pt}]'

The jobs run in order in one process (the import alone takes seconds).

quantize: GPTQ as published (no group-aware reordering, no fallback, no MSE grid search), on the
calibration windows given as token ids, saved as a v1 ("gptq") checkpoint.
forward: the checkpoint loaded by GPTQModel (its pure-PyTorch kernel, fp16: the only dtypes it
offers on CPU are fp16 and bf16), the logits for input_ids and each quantized layer's W^T as
GPTQModel dequantizes it, saved as {"logits": fp32, "weights": {name: fp16 [K, N]}}.
"""
import json
import os
import sys

import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its thread pool sizes itself per core otherwise


def quantize(spec: dict) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], desc_act=spec["desc_act"], sym=True,
                            damp_percent=spec["damp_percent"], damp_auto_increment=0.0, act_group_aware=False,
                            static_groups=False, true_sequential=True, mse=0.0, fallback=None,
                            offload_to_disk=False)
    windows = torch.load(spec["calibration"])
    calibration = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
    model = GPTQModel.load(spec["dense"], config, device="cpu", dtype=torch.float32)
    model.quantize(calibration, batch_size=1, calibration_sort=None)
    model.save(spec["out"])


def forward(spec: dict) -> None:
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(spec["checkpoint"], device="cpu", dtype=torch.float16, backend=BACKEND.TORCH)
    ids = torch.load(spec["input_ids"])
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits.float()
    weights = {name: module.dequantize_weight().detach().to(torch.float16).clone()
               for name, module in model.model.named_modules() if hasattr(module, "dequantize_weight")}
    torch.save({"logits": logits, "weights": weights}, spec["out"])


if __name__ == "__main__":
    for job in json.loads(sys.argv[1]):
        {"quantize": quantize, "forward": forward}[job.pop("op")](job)
