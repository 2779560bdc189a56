"""Regenerate format_vectors.json from bitsandbytes (the oracle). Run only to extend the vectors:
the committed file pins the format so that tests check it where bitsandbytes is not installed."""
import json
from pathlib import Path

import torch

CASES = [  # (name, numel, blocksize, quant_type, double_quant, dtype)
    ("nf4_dq_bs64_fp32", 300, 64, "nf4", True, torch.float32),
    ("nf4_bs64_bf16_odd", 129, 64, "nf4", False, torch.bfloat16),
    ("fp4_bs32_fp16", 100, 32, "fp4", False, torch.float16),
    ("fp4_dq_bs128_fp32_odd", 1001, 128, "fp4", True, torch.float32),
    ("nf4_dq_bs32_fp32_many_blocks", 9000, 32, "nf4", True, torch.float32),
]


def golden_input(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic without a random generator: varied magnitudes, both signs, exact zeros."""
    i = torch.arange(numel, dtype=torch.float64)
    values = torch.sin(i * 0.7311) * (1.0 + 3.0 * torch.cos(i * 0.0173) ** 2)
    values[::17] = 0.0
    return values.to(dtype)


def main():
    import bitsandbytes.functional as bnb_f

    vectors = {}
    for name, numel, blocksize, quant_type, double_quant, dtype in CASES:
        w = golden_input(numel, dtype)
        packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
        serialized = state.as_dict(packed=True)
        vectors[name] = {
            "numel": numel, "blocksize": blocksize, "quant_type": quant_type, "double_quant": double_quant,
            "dtype": str(dtype).removeprefix("torch."),
            "packed_hex": bytes(packed.flatten().tolist()).hex(),
            "absmax_hex": serialized["absmax"].contiguous().view(torch.uint8).numpy().tobytes().hex(),
            "nested_absmax_hex": serialized["nested_absmax"].numpy().tobytes().hex() if double_quant else None,
            "quant_state_json": bytes(serialized[f"quant_state.bitsandbytes__{quant_type}"].tolist()).decode(),
        }
    out = Path(__file__).with_name("format_vectors.json")
    out.write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {len(vectors)} vectors to {out}")


if __name__ == "__main__":
    main()
