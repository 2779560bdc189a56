"""The Triton path of the GPTQ matmul per M bucket, CUDA arch, direction, bits and weight shape, read
from dispatch_table.json beside this file. benchmarks/gptq_kernels_static.py generates it from the
machine-code model (the fastest path for each Llama-3-8B projection at group size 128): regenerate
it, do not edit it.

PATHS: arch -> direction -> bits -> (out_features, in_features) -> ((largest M of the bucket, path),
...), M ascending; past the last bucket the last path. forward: Y = X W^T; backward: dX = dY W.
ops.path_table takes a weight's own entry, else the nearest modelled shape's.
"""
from pathlib import Path

from qlora.kernels.dispatch import read_table

PATHS = read_table(str(Path(__file__).with_name("dispatch_table.json")))["paths"]
