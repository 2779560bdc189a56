"""Regenerate gptq_vectors.json: GPTQ packing computed bit by bit in plain Python, straight from the
layout (AutoGPTQ's pack(): value i of a packed column occupies bits [bits*i, bits*(i+1)) of the
little-endian stream of int32 words; v1 stores zero - 1). It is independent of qlora's vectorised
packer, which the tests compare against it; run it only to extend the vectors."""
import json
from pathlib import Path

CASES = [  # (name, bits, K = in_features, N = out_features, group_size, act_order)
    ("b2_g32", 2, 64, 32, 32, False),
    ("b3_g32", 3, 64, 32, 32, False),
    ("b3_g32_act_order", 3, 96, 32, 32, True),
    ("b4_g32", 4, 64, 16, 32, False),
    ("b4_g16_act_order", 4, 64, 16, 16, True),
    ("b4_per_row", 4, 48, 8, -1, False),
    ("b8_g16", 8, 32, 8, 16, False),
    ("b8_g16_act_order", 8, 32, 8, 16, True),
    ("b2_g16_act_order", 2, 64, 16, 16, True),
    ("b3_per_row", 3, 64, 8, -1, False),
]


def lcg(seed):
    """A deterministic stream of integers without a random library (numerical recipes' LCG)."""
    state = seed
    while True:
        state = (1664525 * state + 1013904223) % 2**32
        yield state


def pack_column(values, bits):
    words = [0] * (-(-len(values) * bits // 32))
    for i, v in enumerate(values):
        for b in range(bits):
            if v >> b & 1:
                position = i * bits + b
                words[position // 32] |= 1 << (position % 32)
    return [w - 2**32 if w >= 2**31 else w for w in words]


def make_case(bits, k, n, group_size, act_order, seed):
    rand = lcg(seed)
    size = k if group_size == -1 else group_size
    groups = -(-k // size)
    codes = [[next(rand) % 2**bits for _ in range(n)] for _ in range(k)]  # [K][N], W^T's layout
    zeros = [[1 + next(rand) % (2**bits - 1) for _ in range(n)] for _ in range(groups)]  # z >= 1 (v1)
    scales = [[(1 + next(rand) % 1000) / 4096 for _ in range(n)] for _ in range(groups)]  # exact in fp16
    order = list(range(k))
    if act_order:  # a permutation as decreasing diag(H) would give: groups are runs in this order
        keys = [next(rand) for _ in range(k)]
        order = sorted(range(k), key=lambda i: -keys[i])
    g_idx = [0] * k
    for position, channel in enumerate(order):
        g_idx[channel] = position // size
    qweight = [pack_column([codes[kk][col] for kk in range(k)], bits) for col in range(n)]  # [N][words]
    qweight = [[qweight[col][w] for col in range(n)] for w in range(len(qweight[0]))]
    qzeros = [pack_column([z - 1 for z in zeros[g]], bits) for g in range(groups)]
    dequantized = [[scales[g_idx[kk]][col] * (codes[kk][col] - zeros[g_idx[kk]][col]) for kk in range(k)]
                   for col in range(n)]  # W [N][K]
    return {"bits": bits, "in_features": k, "out_features": n, "group_size": group_size, "codes": codes,
            "zeros": zeros, "scales": scales, "g_idx": g_idx, "qweight": qweight, "qzeros": qzeros,
            "dequantized": dequantized}


def main():
    vectors = {name: make_case(bits, k, n, g, act, seed) for seed, (name, bits, k, n, g, act) in enumerate(CASES, 1)}
    out = Path(__file__).with_name("gptq_vectors.json")
    out.write_text(json.dumps(vectors, separators=(",", ":")) + "\n")
    print(f"wrote {len(vectors)} vectors to {out}")


if __name__ == "__main__":
    main()
