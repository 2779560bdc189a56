"""The 4-bit Triton path per M bucket, weight and CUDA arch, and the model's estimates, read from
dispatch_table.json beside this file. benchmarks/kernels_static.py generates it from its
machine-code model (at every M of its sweep the path with the lowest estimate, per Llama-3-8B
projection, direction and blocksize, NF4 + double quant): regenerate it, do not edit it.

PATHS: arch -> direction -> (out_features, in_features, blocksize) -> ((largest M of the bucket,
path), ...), M ascending; past the last bucket the last path. forward: Y = X W^T; backward: dX = dY W.
ops.path_table takes a weight's own entry, else the nearest modelled shape's.
PREDICTIONS: arch -> {"<projection> M=<m>": {path: estimated us}}, forward: what `qlora doctor` prints.
"""
from pathlib import Path

from qlora.kernels.dispatch import read_table

_TABLE = read_table(str(Path(__file__).with_name("dispatch_table.json")))
PATHS = _TABLE["paths"]
PREDICTIONS = _TABLE["predictions"]
