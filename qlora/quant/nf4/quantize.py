"""Blockwise 4-bit quantization in the bitsandbytes format, pure PyTorch, vectorised.

`quantize_4bit` / `dequantize_4bit` keep bitsandbytes' functional names so migrating code reads
the same. The arithmetic mirrors bitsandbytes' CPU backend operation by operation, because the
output must be byte-for-byte what it produces: the tests compare against it and golden bytes.
"""
from __future__ import annotations

import functools

import torch

from qlora.kernels import selfcheck
from qlora.kernels.backend import use_cpu_kernels
from qlora.kernels.nf4 import cpu as cpu_kernels
from qlora.kernels.nf4 import ops
from qlora.kernels.dtypes import FLOAT_DTYPES
from qlora.kernels.nf4.format import NESTED_BLOCKSIZE, check_blocksize, check_storage_dtype
from qlora.quant.nf4.codes import QUANT_TYPES, dynamic_map, get_4bit_code, quantize_bounds
from qlora.quant.nf4.state import QuantState


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _blockwise_absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and w / absmax clamped to [-1, 1], as bitsandbytes computes them.

    Full blocks multiply by the reciprocal, the partial last block divides: that asymmetry is in
    bitsandbytes' CPU quantizer, and one ulp decides ties at the code midpoints.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.empty_like(flat)
    torch.mul(blocks, (1.0 / absmax.clamp(min=1e-38))[:, None], out=scaled[:full].view(-1, blocksize))
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        torch.div(flat[full:], tail_absmax, out=scaled[full:])
        absmax = torch.cat((absmax, tail_absmax[None]))
    return absmax, scaled.clamp_(-1, 1)


# Elements quantized per step: a multiple of every blocksize (and even), so chunks hold whole blocks
# and whole bytes. It bounds the fp32/int32 temporaries to ~12 MB whatever the weight's size, which
# keeps peak host memory flat while a model streams in.
_CHUNK = 1 << 20


def _quantize_4bit_codes(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n + 1) // 2], fp32 absmax per block): on CPU tensors the C quantize
    (kernels/nf4/cpu_quantize.c, the same bytes in one pass; backend rule of kernels/backend.py),
    else the twin below."""
    if use_cpu_kernels(w.device, cpu_kernels.quantize_available) and selfcheck.passed("cpu_quantize", w.device, w.dtype):
        midpoints, order = quantize_bounds(quant_type, w.device)
        return cpu_kernels.quantize_4bit_cpu(w, blocksize, midpoints, order)
    return _quantize_4bit_codes_torch(w, blocksize, quant_type)


def _quantize_4bit_codes_torch(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin: bitsandbytes' CPU quantizer op for op, in chunks of _CHUNK elements."""
    flat = w.reshape(-1)
    if flat.numel() <= _CHUNK:
        return _quantize_4bit_chunk(flat, blocksize, quant_type)
    pieces = [_quantize_4bit_chunk(flat[i:i + _CHUNK], blocksize, quant_type) for i in range(0, flat.numel(), _CHUNK)]
    return torch.cat([p for p, _ in pieces]), torch.cat([a for _, a in pieces])


def _quantize_4bit_chunk(flat: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    flat = flat.float()
    absmax, scaled = _blockwise_absmax_and_scaled(flat, blocksize)
    if scaled.numel() % 2:
        # The pad is a scaled 0.0, so its nibble is the code of zero (7 for NF4), not 0.
        scaled = torch.cat((scaled, scaled.new_zeros(1)))
    midpoints, order = quantize_bounds(quant_type, flat.device)
    sorted_index = torch.bucketize(scaled, midpoints, out_int32=True)
    codes = (sorted_index if quant_type == "nf4" else order[sorted_index]).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def _quantize_nested(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' 8-bit blockwise quantizer as its CPU backend runs it (0.50+).

    Each value is scaled by the reciprocal of its block's absmax, binned into 65536 uniform bins
    over [-1, 1], and the bin's nearest code is looked up in a table built once per code book.
    The binning, not an exact nearest search, decides values within ~1.5e-5 of a midpoint, so it is
    reproduced exactly. An all-zero block gets code 0.
    """
    n = values.numel()
    padded = -(-n // blocksize) * blocksize
    blocks = torch.nn.functional.pad(values, (0, padded - n)).view(-1, blocksize)
    # Padding with 0 cannot raise a block's absmax, so the tail block's absmax is its own.
    absmax = blocks.abs().amax(dim=-1)
    # 0 * inf is NaN in an all-zero block: make it 0 so it bins safely, then give the block code 0.
    normed = (blocks * (1.0 / absmax)[:, None]).clamp_(-1, 1).nan_to_num_(0.0)
    bins = (((normed + 1.0) * 0.5) * (_NESTED_BINS - 1) + 0.5).long()
    codes = _nested_bin_table(code)[bins]
    codes[absmax == 0] = 0
    return codes.view(-1)[:n], absmax


_NESTED_BINS = 65536


def _nested_bin_table(code: torch.Tensor) -> torch.Tensor:
    """Code index for each of the 65536 bins: the number of code midpoints below the bin's value."""
    if torch.equal(code.cpu(), dynamic_map()):
        return _dynamic_map_bin_table().to(code.device)
    return _build_bin_table(code)


@functools.lru_cache(maxsize=1)
def _dynamic_map_bin_table() -> torch.Tensor:
    return _build_bin_table(dynamic_map())


def _build_bin_table(code: torch.Tensor) -> torch.Tensor:
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = torch.arange(_NESTED_BINS, dtype=torch.float32, device=code.device)
    bin_values = -1.0 + (2.0 * bins) / float(_NESTED_BINS - 1)
    return torch.searchsorted(midpoints, bin_values, side="left").to(torch.uint8)


@selfcheck.register("cpu_quantize")
def _check_cpu_quantize(device, dtype):
    """The C quantize, built for this CPU: the twin's bytes on an odd-sized weight (a partial last
    block, an odd element count) holding ties at NF4 and FP4 midpoints, zeros, a subnormal block, inf
    and NaN."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37 * 97, generator=g)
    for quant_type in QUANT_TYPES:
        midpoints, order = quantize_bounds(quant_type, "cpu")
        # Block 1's absmax is 1 (scaled by exactly 1): its values sit on the midpoints.
        w[64:128] = torch.cat((midpoints, torch.ones(1), torch.linspace(-0.9, 0.9, 48)))
        w[128:192] = 0.0
        w[192:256] = 1e-40
        w[300], w[400] = float("inf"), float("nan")
        x = w.to(dtype)
        for blocksize in (64, 256):
            got = cpu_kernels.quantize_4bit_cpu(x, blocksize, midpoints, order)
            want = _quantize_4bit_codes_torch(x, blocksize, quant_type)
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.int32), want[1].view(torch.int32))):
                differ = (got[0] != want[0]).sum().item()
                return False, f"{quant_type} blocksize {blocksize}: {differ} packed bytes differ from the twin's, or the absmax"
    return True, "the twin's bytes"


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize `w` (fp32/fp16/bf16, any shape) to packed 4-bit codes plus its QuantState.

    Returns `(packed, state)`: packed holds two codes per byte, first element in the high nibble,
    shape ((numel + 1) // 2, 1) in uint8 or the same bytes reinterpreted as `quant_storage`.
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_storage_dtype(quant_storage)
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"quantize_4bit needs a float32, float16 or bfloat16 tensor, got {got}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(w.shape)}")

    packed, absmax = _quantize_4bit_codes(w, blocksize, quant_type)
    if quant_storage != torch.uint8:
        itemsize = torch.empty(0, dtype=quant_storage).element_size()
        if packed.numel() % itemsize:
            raise ValueError(
                f"quant_storage={quant_storage} needs the packed size ({packed.numel()} bytes) to be a "
                f"multiple of {itemsize}; use quant_storage=torch.uint8 for a weight of {w.numel()} elements"
            )
        packed = packed.view(quant_storage)
    state = QuantState(
        absmax=absmax,
        shape=w.shape,
        dtype=w.dtype,
        blocksize=blocksize,
        code=get_4bit_code(quant_type, w.device),
        quant_type=quant_type,
    )
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map(w.device)
        state.absmax, state.nested_absmax = _quantize_nested(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state.nested_code = nested_code
        state.offset = offset
    return packed.unsqueeze(1), state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Invert `quantize_4bit`: a tensor of `state.shape` in `dtype` (default: the original dtype).

    Runs through the qlora::dequantize_4bit op, so on a GPU it is the Triton kernel (QLORA_BACKEND).
    A weight of any shape is decoded as the [1, numel] matrix the kernels index, then reshaped.
    """
    dtype = dtype or state.dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dequantize_4bit can produce float32, float16 or bfloat16, got {dtype}")
    return ops.dequantize(state.packed_view(packed), dtype).view(state.shape)
