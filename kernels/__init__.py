"""4-bit kernels (installed as qlora.kernels). Imports nothing from the rest of qlora.

`Packed4bit` is a packed 4-bit weight as every kernel takes it; `formats` holds the blocksize and
dtype rules the quantizer shares; `reference` holds the pure-PyTorch twins (the CPU path and the
test oracle); `linear_4bit` is the frozen-weight 4-bit linear with autograd; `ops` registers the custom ops qlora::dequantize_4bit and
qlora::matmul_4bit and holds the dispatch rule; `adamw8bit_update_` is the fused 8-bit AdamW step
(optim.py). The Triton modules (dequantize, matmul, gemv, adamw8bit) are imported on first use,
so the CPU path never imports triton, and a process that sets TRITON_INTERPRET=1 before that
first use gets interpreted kernels. Every launch goes through `launch.launch`, so
`launch.compile_only(arch)` can compile the real launches for a GPU on a machine without one, and
`machine_code` reads registers, spills and the instruction mix from the result.
"""
from qlora.kernels import formats, ops, reference
from qlora.kernels.backend import get_backend, set_backend
from qlora.kernels.linear import Linear4bitFunction, linear_4bit
from qlora.kernels.optim import adamw8bit_update_
from qlora.kernels.packed import Packed4bit

__all__ = ["Linear4bitFunction", "Packed4bit", "adamw8bit_update_", "formats", "get_backend", "linear_4bit", "ops",
           "reference", "set_backend"]
