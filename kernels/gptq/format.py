"""PackedGPTQ: one GPTQ weight as every GPTQ kernel, check and twin takes it, and the bit packing.

The layout is AutoGPTQ/GPTQModel's (see the project design notes, GPTQ): for W [N = out, K = in],
- qweight int32 [ceil(K*bits/32), N]: column n of W^T packed along K;
- qzeros int32 [groups, ceil(N*bits/32)]: the zero points packed along N;
- scales fp16 [groups, N]; g_idx int32 [K]: the group of each input channel.
Packing is one rule for every width: the packed dimension is a little-endian bit stream and value i
occupies bits [bits*i, bits*(i+1)). For 2/4/8 bits a value never crosses a word (element k sits in
word k // (32/bits) at bit bits*(k % (32/bits))); for 3 bits 32 values fill 3 words and values 10
and 21 straddle words 0-1 and 1-2, which the same rule gives.

zero_offset is what the stored zero lacks: 1 for v1 checkpoints ("gptq": z-1 is stored and the
kernels add 1 back), 0 for v2 ("gptq_v2"). perm, when given, is the act-order permutation applied
once at load: qweight and g_idx are then held with input channel i = original channel perm[i], so
that groups are contiguous runs of K; x is gathered by perm before the product and dX scattered back.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

BITS = (2, 3, 4, 8)
WORD_BITS = 32


class PackedGPTQ(NamedTuple):
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    perm: Optional[torch.Tensor]
    bits: int
    zero_offset: int
    shape: tuple[int, int]  # [N = out_features, K = in_features]

    @property
    def device(self) -> torch.device:
        return self.qweight.device



def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"GPTQ bits must be one of {list(BITS)}, got {bits!r}")
    return bits


def packed_words(count: int, bits: int) -> int:
    """int32 words holding `count` values of `bits` bits."""
    return -(-count * bits // WORD_BITS)


def unpack(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """The `count` unsigned values packed along `dim` of an int32 tensor, as int32."""
    check_bits(bits)
    moved = words.movedim(dim, 0)
    mask = (1 << bits) - 1
    if WORD_BITS % bits == 0:
        per_word = WORD_BITS // bits
        shifts = (torch.arange(per_word, device=words.device, dtype=torch.int32) * bits).view(1, per_word, *[1] * (moved.dim() - 1))
        # Arithmetic shift of a signed word, then the mask: the sign bits never reach the low `bits`.
        values = (moved.unsqueeze(1) >> shifts) & mask
        values = values.reshape(-1, *moved.shape[1:])[:count]
    else:  # 3 bits: a value may straddle two words; int64 keeps the shifts free of sign and overflow
        wide = moved.to(torch.int64) & 0xFFFFFFFF
        start = torch.arange(count, device=words.device) * bits
        word, shift = start // WORD_BITS, start % WORD_BITS
        view = (-1, *[1] * (moved.dim() - 1))
        low = wide[word] >> shift.view(view)
        high = wide[(word + 1).clamp(max=wide.shape[0] - 1)] << (WORD_BITS - shift).view(view)
        straddles = (shift + bits > WORD_BITS).view(view)
        values = torch.where(straddles, low | high, low) & mask
    return values.to(torch.int32).movedim(0, dim).contiguous()


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned integer values (each < 2**bits) along `dim` into int32 words."""
    check_bits(bits)
    moved = values.movedim(dim, 0).to(torch.int64)
    count = moved.shape[0]
    words = packed_words(count, bits)
    start = torch.arange(count, device=values.device) * bits
    word, shift = start // WORD_BITS, start % WORD_BITS
    view = (-1, *[1] * (moved.dim() - 1))
    out = torch.zeros(words + 1, *moved.shape[1:], dtype=torch.int64, device=values.device)
    # Fields are disjoint, so adding them is or-ing them.
    out.index_add_(0, word, (moved << shift.view(view)) & 0xFFFFFFFF)
    straddles = shift + bits > WORD_BITS
    if bool(straddles.any()):
        spill = moved[straddles] >> (WORD_BITS - shift[straddles]).view(view)
        out.index_add_(0, word[straddles] + 1, spill)
    out = out[:words]
    out = torch.where(out >= 2**31, out - 2**32, out)  # the same 32 bits, as a signed int32
    return out.to(torch.int32).movedim(0, dim).contiguous()


def check_packed(weight: PackedGPTQ, where: str = "GPTQ weight") -> None:
    """The tensors agree with each other and with bits/shape (shapes and dtypes only: no sync)."""
    qweight, qzeros, scales, g_idx, perm, bits, zero_offset, shape = weight
    check_bits(bits)
    n, k = (int(s) for s in shape)
    groups = scales.shape[0] if scales.dim() == 2 else -1
    expected = {
        "qweight": (qweight, torch.int32, (packed_words(k, bits), n)),
        "qzeros": (qzeros, torch.int32, (groups, packed_words(n, bits))),
        "g_idx": (g_idx, torch.int32, (k,)),
    }
    if scales.dim() != 2 or scales.shape[1] != n or not scales.is_floating_point():
        raise ValueError(f"{where}: scales must be a float [groups, {n}] tensor for a [{n}, {k}] weight, got "
                         f"{scales.dtype} {list(scales.shape)}; the checkpoint's shapes are inconsistent")
    for name, (tensor, dtype, want) in expected.items():
        if tensor.dtype != dtype or tuple(tensor.shape) != want:
            raise ValueError(f"{where}: {name} must be {str(dtype).removeprefix('torch.')} {list(want)} for a "
                             f"{bits}-bit [{n}, {k}] weight with {groups} groups, got "
                             f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}; the checkpoint's "
                             "shapes are inconsistent (or its bits/group_size in the config are not the ones it was "
                             "written with)")
    if perm is not None and (perm.dtype != torch.int64 or tuple(perm.shape) != (k,)):
        raise ValueError(f"{where}: perm must be int64 [{k}], got {perm.dtype} {list(perm.shape)}")
    if zero_offset not in (0, 1):
        raise ValueError(f"{where}: zero_offset must be 1 (v1 'gptq') or 0 (v2 'gptq_v2'), got {zero_offset}")
    devices = {t.device for t in (qweight, qzeros, scales, g_idx, perm) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{where}: tensors are on several devices {sorted(map(str, devices))}; move the weight with .to()")
