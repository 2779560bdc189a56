"""One machine-code model of a GPU kernel's time, for every kernel family this project models (NF4,
int8, GPTQ, grouped MoE) and for the peers it is compared with (cuBLAS bf16, gemlite).

    from gpu_model import CARDS, kernel_time, cublas_time
    launch = ...                                   # a compiled launch: qlora.kernels.machine_code.MachineCode
    t = kernel_time(launch, "H100", programs=224, trips=64, dram_bytes=30e6)
    t["estimate_us"], t["breakdown"]               # microseconds, and every bound that made it

The same rules for every kernel, ours and the peers', so a ratio between two estimates means something:

1. Busiest SM. A launch of P programs on S SMs puts ceil(P / S) programs on the busiest SM, c of
   them resident at once (c = min(blocks per SM from registers / shared memory / threads, that
   count)); it runs ceil(ceil(P / S) / c) rounds. The kernel takes as long as that SM.
2. One trip of the main loop, per warp, takes the longest of
   - issue: the warps sharing a scheduler (c x warps / 4) times the loop's instructions, each unit
     at its own rate per scheduler and clock: any instruction 1, integer ALU 0.5 (16 lanes per
     partition on sm_80-90), fp32 0.5 on sm_80 (16 lanes) and 1 on sm_86/89/90 (32), MUFU and
     F2F/I2F/F2I conversions 0.125 (16 per SM), load/store unit 0.25 (one warp instruction per SM
     and clock; SHFL with them: 32 results per SM and clock); and per SM the L1/shared-memory data
     path: shared memory 128 B per clock (LDS/STS/LDSM bytes, a warp shuffle's 32 x 4 B; not what a
     warpgroup MMA reads of its operands from shared memory: charged at 128 B a clock, those reads put
     gemlite's H100 GEMM at M = 256 at 0.23x bf16 against 0.41x published), plus one clock per
     128 B of a coalesced global load or store, plus each gather's clocks: the L1 looks up 4 line
     tags and moves 4 sectors a clock, so a warp's 32 lookups into a table cost max(distinct
     lines, distinct sectors) / 4 clocks, expected over
     uniform indices (gather_wavefronts): 1 for the 16 fp32 NF4 codes (64 B), ~6.3 for a 2 KB
     table of 8-byte code pairs. What a gather reads is the caller's to say (gather_tables);
     an unknown table is charged 8 (every lane its own line);
   - tensor: the loop's MMA FLOPs of the c resident programs over the SM's tensor rate x
     TENSOR_EFFICIENCY (mma.sync on sm_90 at HMMA_SM90_FRACTION of the wgmma peak; an MMA that
     accumulates in fp16, HMMA.16816.F16, at the card's fp16-accumulate rate: twice the fp32 one
     on GeForce cards);
   (issue, the L1/shared-memory path and tensor cores overlap imperfectly: the largest of the three plus OVERLAP
   times the other two)
   - dependency chain: the longest register chain through one trip, with per-opcode latencies
     (LATENCY), plus BARRIER_CYCLES per BAR.SYNC;
   - memory latency: each DRAM stream of the loop (an LDG/LDGSTS whose address does not come from
     another load of the same trip or of the trip before, and is not the same every trip; gathers
     such as code-table lookups, and loads of one address every trip, hit L1/L2 and sit in the chain
     instead) is consumed d trips after it is issued, read from the code: the first reader of the
     LDG's register, or the LDS of the LDGSTS's shared address, or Triton's num_stages - 1 when the
     buffer rotates. A load used d < 1 trips later stalls the warp: trip >= latency + (1 - d) x
     the rest; d >= 1 trips ahead: trip >= latency / d (Little's law: bytes in flight per SM =
     resident programs x bytes per trip x d).
   The code outside the loop adds its issue time and one DRAM latency (prologue loads, epilogue
   stores); the part of a split-K epilogue that only the last split runs (the partial sums' sum,
   past the exit of the other splits: MachineCode.last_split_instructions) is issued once. The
   latencies of that sum are the caller's to charge (kernels_static.py's fix-up).
3. DRAM: bytes moved / (the card's bandwidth x BANDWIDTH_FRACTION).
4. Estimate = max(rounds x round time, DRAM) + FIXED_US, for every kernel, cuBLAS included.

cuBLAS is not compiled here: it is modelled as a kernel that has no latency or issue limit of its own,
taking the best of its tile shapes (128x256 .. 64x64) and split-K factors (1..16) with busiest-SM waves,
at the same bandwidth fraction, tensor efficiency and fixed cost. That is generous to cuBLAS, which is the side a model
must not flatter us against.

The free parameters (BANDWIDTH_FRACTION, FIXED_US, LATENCY_SCALE, TENSOR_EFFICIENCY, OVERLAP) are fitted by
benchmarks/calibration.py on published timings of kernels compiled through this same path (gemlite),
and the fitted values are what kernel_time uses by default (PARAMETERS, read from
benchmarks/results/calibration.json when present).

Card constants (spec sheets; 'dense' = without structured sparsity; tensor = bf16/fp16 with fp32
accumulation, which is what both our kernels and cuBLAS use):
- A100 SXM4 80 GB, sm_80: 108 SMs, 1410 MHz, 2039 GB/s, 312 TFLOP/s, int8 624 TOPS (A100 datasheet).
- H100 SXM5 80 GB, sm_90: 132 SMs, 1830 MHz (the clock of the spec TFLOP/s), 3350 GB/s, 989 TFLOP/s,
  int8 1979 TOPS (H100 datasheet, Hopper whitepaper table 2).
- A10, sm_86: 72 SMs, 1695 MHz, 600 GB/s, 125 TFLOP/s, int8 250 TOPS (A10 datasheet).
- RTX 3090, sm_86: 82 SMs, 1695 MHz, 936 GB/s, 71 TFLOP/s with fp32 accumulation (142 accumulating
  in fp16), int8 284 TOPS (GA102 whitepaper, appendix table: GeForce cards run fp32-accumulate MMAs
  at half rate). An MMA's accumulator is in its SASS (HMMA.16816.F32 against HMMA.16816.F16).
- L4, sm_89: 58 SMs, 2040 MHz, 300 GB/s, 121 TFLOP/s, int8 242.5 TOPS (L4 datasheet).
- RTX 4090, sm_89: 128 SMs, 2520 MHz, 1008 GB/s, 165.2 TFLOP/s with fp32 accumulation (330.3 in
  fp16), int8 660.6 TOPS (Ada whitepaper, appendix table).
DRAM load latency in cycles from microbenchmark papers (Jia et al. 2018-2019 for the method; "Dissecting
the Ampere GPU architecture" and "Benchmarking and dissecting the Nvidia Hopper GPU architecture",
Luo et al. 2024): ~470 (A100), ~480 (H100), ~520 (GA10x), ~540 (AD10x); LATENCY_SCALE calibrates them.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

CALIBRATION = Path(__file__).parent / "results" / "calibration.json"


@dataclass(frozen=True)
class Card:
    name: str
    arch: int  # sm_<arch>: what the kernels are compiled for
    sms: int
    clock_ghz: float
    bandwidth_gbs: float
    tensor_tflops: float  # dense bf16/fp16 with fp32 accumulation
    dram_latency_cycles: int
    int8_tops: float  # dense int8 tensor ops with int32 accumulation
    fp16_accumulate_tflops: float = 0.0  # dense fp16 MMAs accumulating in fp16, where faster (GeForce)

    @property
    def fp16_accumulate_flop_per_clock(self) -> float:
        """Per SM; the fp32-accumulate rate where the card runs both alike."""
        return (self.fp16_accumulate_tflops or self.tensor_tflops) * 1e12 / (self.sms * self.clock_ghz * 1e9)

    @property
    def int8_op_per_clock(self) -> float:
        """Per SM."""
        return self.int8_tops * 1e12 / (self.sms * self.clock_ghz * 1e9)

    @property
    def tensor_flop_per_clock(self) -> float:
        """Per SM."""
        return self.tensor_tflops * 1e12 / (self.sms * self.clock_ghz * 1e9)

    @property
    def fp32_per_clock(self) -> float:
        """Warp instructions per scheduler and clock on the fp32 pipe: 16 lanes on sm_80, 32 after."""
        return 0.5 if self.arch == 80 else 1.0


CARDS = {
    "A100": Card("A100", 80, 108, 1.41, 2039, 312, 470, 624),
    "H100": Card("H100", 90, 132, 1.83, 3350, 989, 480, 1979),
    "A10": Card("A10", 86, 72, 1.695, 600, 125, 520, 250),
    "RTX 3090": Card("RTX 3090", 86, 82, 1.695, 936, 71, 520, 284, 142),
    "L4": Card("L4", 89, 58, 2.04, 300, 121, 540, 242.5),
    "RTX 4090": Card("RTX 4090", 89, 128, 2.52, 1008, 165.2, 540, 660.6, 330.3),
}
SCHEDULERS = 4
SHARED_BYTES_PER_CLOCK = 128  # per SM: the L1/shared-memory data stage
LINE_BYTES, SECTOR_BYTES, TAGS_PER_CLOCK = 128, 32, 4  # L1: 128-byte lines of 32-byte sectors, 4 tag lookups a clock
BARRIER_CYCLES = 20  # a BAR.SYNC that every warp reaches together; more when they do not
HMMA_SM90_FRACTION = 0.6  # mma.sync on Hopper reaches ~60% of the wgmma peak (Luo et al. 2024, fig. 12)
# An L2 hit's latency over a DRAM load's: ~200 against ~470 cycles on the A100 ("Dissecting the Ampere
# GPU architecture"); 222-339, mean ~279, on an AD102 (L40; Alpay and Basaran 2026, per-SM L2 probe)
# against ~540. The upper part of that spread, so that it does not flatter.
L2_LATENCY_FRACTION = 0.6

DEFAULT_PARAMETERS = {"bandwidth_fraction": 0.85, "fixed_us": 2.5, "latency_scale": 1.0, "tensor_efficiency": 0.8,
                      "overlap": 0.0}

# Unit of each opcode (its base, before the first dot) and the issue rate of that unit per scheduler
# and clock; what is not listed issues at 1.
INTEGER = {"IMAD", "IADD3", "IADD", "LOP3", "SHF", "LEA", "PRMT", "ISETP", "IMNMX", "SEL", "BFE", "BFI", "POPC",
           "FLO", "IABS", "VIADD", "IMUL", "I2FP", "F2FP", "SGXT", "BMSK", "LOP", "SHL", "SHR", "IDP", "IMNMX", "VIMNMX"}
FP32 = {"FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "HFMA2", "HADD2", "HMUL2", "FCHK", "FSWZADD"}
SLOW = {"MUFU", "F2F", "F2I", "I2F", "FRND"}  # 16 per SM and clock
LOAD_STORE = {"LDG", "STG", "LDGSTS", "LDS", "STS", "LDSM", "ATOM", "ATOMG", "RED", "LD", "ST", "LDC", "ATOMS",
              "UTMALDG", "UTMASTG", "SHFL"}  # SHFL: 32 results per SM and clock (CUDA guide's throughput table)
# Latency in cycles of a dependent use (Jia et al. 2019 for Turing/Ampere; fixed-latency ALU 4-6).
LATENCY = {"default": 5, "IMAD": 5, "MUFU": 20, "F2F": 12, "F2I": 12, "I2F": 12, "LDS": 30, "LDSM": 32,
           "LDC": 30, "HMMA": 32, "HGMMA": 64, "IMMA": 32, "SHFL": 30, "gather": 40}
_REGISTER = re.compile(r"\bR(\d+)\b")
_NO_DESTINATION = {"STG", "STS", "ST", "RED", "BAR", "BRA", "DEPBAR", "LDGDEPBAR", "LDGSTS", "EXIT", "MEMBAR", "WARPSYNC",
                   "NOP", "ISETP", "FSETP", "BSSY", "BSYNC", "UTMALDG", "UTMASTG", "WARPGROUP", "FENCE", "ERRBAR", "CCTL",
                   "SYNCS", "ARRIVES", "YIELD"}


def load_parameters() -> dict:
    """The fitted parameters (benchmarks/results/calibration.json), or the defaults before any fit."""
    if CALIBRATION.exists():
        return {**DEFAULT_PARAMETERS, **json.loads(CALIBRATION.read_text())["parameters"]}
    return dict(DEFAULT_PARAMETERS)


PARAMETERS = load_parameters()


def card(name_or_arch) -> Card:
    """A card by name ("H100") or, for the tables keyed by architecture, the datacenter card of an arch."""
    if isinstance(name_or_arch, Card):
        return name_or_arch
    if name_or_arch in CARDS:
        return CARDS[name_or_arch]
    by_arch = {80: "A100", 86: "A10", 89: "L4", 90: "H100"}
    if name_or_arch in by_arch:
        return CARDS[by_arch[name_or_arch]]
    raise KeyError(f"unknown card {name_or_arch!r}: one of {', '.join(CARDS)} or an arch 80/86/89/90")


# ---- what the model reads from the main loop's SASS ------------------------------------------------
def _registers(text: str) -> list[int]:
    """Registers named in an operand list; a 64-bit operand R4.64 names R4 and R5."""
    out = []
    for match in re.finditer(r"\bR(\d+)(\.64|\.128)?\b", text):
        base = int(match.group(1))
        width = {".64": 2, ".128": 4}.get(match.group(2), 1)
        out.extend(range(base, base + width))
    return out


def _split(mnemonic: str, operands: str):
    """(destination registers, source registers) of one instruction."""
    base = mnemonic.split(".")[0]
    parts = [p.strip() for p in operands.split(",")]
    if base in _NO_DESTINATION or not parts or not parts[0].startswith("R") or parts[0] == "RZ":
        return [], _registers(operands)
    width = 1
    if base in ("LDG", "LDS", "LDSM", "LD", "LDC"):
        size = re.search(r"\.(64|128)\b", mnemonic)
        width = int(size.group(1)) // 32 if size else 1
        if base == "LDSM":
            width = {"": 1, "X2": 2, "X4": 4}.get((re.search(r"\.(X2|X4)\b", mnemonic) or [None, ""])[1], 1)
    elif base in ("HMMA", "IMMA"):
        width = 4 if ("16816" in mnemonic or "1688" in mnemonic) and not _fp16_accumulate(mnemonic) else 2
    elif base == "CS2R" or mnemonic.endswith(".64") or ".WIDE" in mnemonic:
        width = 2
    first = int(parts[0][1:].split(".")[0]) if parts[0][1:].split(".")[0].isdigit() else None
    destination = list(range(first, first + width)) if first is not None else []
    return destination, _registers(",".join(parts[1:]))


_VARYING = {"LDG", "LDS", "LDSM", "LD", "LDGSTS", "SHFL", "ATOM", "ATOMG", "ATOMS", "RED", "HMMA", "HGMMA", "IMMA",
            "IGMMA", "S2UR", "CS2R", "R2UR", "VOTE", "MATCH", "POPC"}


def _same_address_every_trip(lines: list) -> set[int]:
    """Indices of the loop's LDGs whose address is the same every trip: made in the loop (ptxas
    recomputes such addresses rather than hold them in registers) only from constants, kernel
    parameters (LDC), the lane or thread index and registers the loop does not change. A register's
    state at the top of the trip is its state at the end of the last one, so the loop is walked until
    that settles. Anything loaded, shuffled or chosen by a predicate varies."""
    uniform_written = {int(u) for mnemonic, operands in lines if mnemonic.startswith("U")
                       for u in re.findall(r"^\s*UR(\d+)", operands)}
    # Pessimistic start: whatever the loop writes varies (a counter r = r + 64 only ever reads itself)
    # until an instruction in this trip makes it from invariant values.
    varying = {r for mnemonic, operands in lines for r in _split(mnemonic, operands)[0]}
    found: set[int] = set()
    for _ in range(4):
        before, found = set(varying), set()
        for i, (mnemonic, operands) in enumerate(lines):
            base = mnemonic.split(".")[0]
            destination, sources = _split(mnemonic, operands)
            uniform = {int(u) for u in re.findall(r"\bUR(\d+)", operands.split(",", 1)[-1])}
            if base == "LDG":
                address = re.findall(r"\[([^\]]*)\]", operands)[-1:]
                if address and not (set(_registers(address[0])) & varying) and not (
                        {int(u) for u in re.findall(r"\bUR(\d+)", address[0])} & uniform_written):
                    found.add(i)
            lane = base == "S2R" and re.search(r"SR_(LANEID|TID)", operands)
            varies = (base in _VARYING or (base == "S2R" and not lane) or re.search(r"\bP[0-6]\b|@", mnemonic + operands)
                      or set(sources) & varying or uniform & uniform_written)
            for r in destination:
                (varying.add if varies else varying.discard)(r)
        if varying == before:
            break
    return found


def _access_bytes(mnemonic: str) -> int:
    """Bytes per thread of a load/store: .64 / .128 suffixes, else 4 (U8/U16 still take a 4-byte slot)."""
    size = re.search(r"\.(64|128)\b", mnemonic)
    return int(size.group(1)) // 8 if size else 4


@dataclass
class LoopFacts:
    """What one trip of the main loop costs a warp, read from its SASS."""

    issue_cycles: float  # per warp, with per-unit rates (before warps share a scheduler)
    shared_bytes: float  # per warp: LDS/STS/LDSM/LDGSTS-to-shared bytes and SHFL's
    chain_cycles: float  # longest register dependency chain + barriers
    stream_distance: float | None  # trips between issuing a DRAM stream and its first use (min over streams)
    streams: int  # DRAM stream loads per trip
    stream_wavefronts: float = 0.0  # per warp: L1 cycles of the loop's coalesced global loads and stores
    gathers: dict = None  # per warp: gather instructions by bytes per lane, {4: 32, 8: 16}


_FACTS: dict = {}  # (id(code), fp32 rate) -> (code, LoopFacts): the SASS is read once per code


def loop_facts(code, card: Card) -> LoopFacts:
    key = (id(code), card.fp32_per_clock)
    if key not in _FACTS or _FACTS[key][0] is not code:
        _FACTS[key] = (code, _read_loop(code, card))
    return _FACTS[key][1]


def _gathers(lines: list) -> set[int]:
    """Indices of the loop's gathers: LDG/LDGSTS whose address comes from a loaded value, whether
    loaded earlier in the same trip or in the trip before (a register carried round the loop, as
    when the next trip's bytes are fetched ahead); the loop is walked twice for the carried ones."""
    loaded: set[int] = set()
    found: set[int] = set()
    for i, (mnemonic, operands) in enumerate(lines + lines):
        base = mnemonic.split(".")[0]
        destination, sources = _split(mnemonic, operands)
        if base in ("LDG", "LDGSTS") and any(r in loaded for r in sources):
            found.add(i % len(lines))
        for r in destination:
            # LDC reads a kernel parameter from the constant bank: an address made from it is a stream.
            if base in ("LDG", "LDS", "LDSM") or any(s in loaded for s in sources):
                loaded.add(r)
            else:
                loaded.discard(r)
    return found


def _read_loop(code, card: Card) -> LoopFacts:
    lines = code.loop_lines
    gathers = _gathers(lines)
    counts = {"any": 0.0, "int": 0.0, "fp32": 0.0, "slow": 0.0, "lsu": 0.0}
    shared = 0.0
    ready: dict[int, float] = {}  # register -> cycle its value is ready, within the trip
    chain, barriers, streams, distances = 0.0, 0, 0, []
    wavefronts, by_width = 0.0, {}
    n = len(lines)
    same_every_trip = _same_address_every_trip(lines)
    for i, (mnemonic, operands) in enumerate(lines):
        base = mnemonic.split(".")[0]
        counts["any"] += 1
        if base in INTEGER:
            counts["int"] += 1
        elif base in FP32:
            counts["fp32"] += 1
        elif base in SLOW:
            counts["slow"] += 1
        elif base in LOAD_STORE:
            counts["lsu"] += 1
        if base in ("LDS", "STS", "LDSM") and "RZ]" not in operands.replace(" ", ""):
            shared += 32 * _access_bytes(mnemonic) * (4 if base == "LDSM" and "X4" in mnemonic else 1)
        if base == "LDGSTS":
            shared += 32 * _access_bytes(mnemonic)
        if base == "SHFL":
            shared += 32 * 4  # a warp shuffle crosses the same data path: 32 lanes x 4 B a clock
        if base == "BAR":
            barriers += 1
        destination, sources = _split(mnemonic, operands)
        start = max((ready.get(r, 0.0) for r in sources), default=0.0)
        gather = i in gathers
        if gather:
            by_width[_access_bytes(mnemonic)] = by_width.get(_access_bytes(mnemonic), 0) + 1
        elif base in ("LDG", "STG", "LDGSTS", "RED", "ATOMG", "REDG"):
            wavefronts += math.ceil(32 * _access_bytes(mnemonic) / LINE_BYTES)  # a warp's contiguous bytes
        if i in same_every_trip and not gather:
            # The same address every trip (a constant table's line, one per lane): an L1 hit after
            # the first trip, not a DRAM stream.
            latency = LATENCY["gather"]
        elif base in ("LDG", "LDGSTS") and not gather:
            streams += 1
            distances.append(_stream_distance(lines, i, destination, code.num_stages))
            latency = 0.0  # charged by the memory-latency bound, not the chain
        elif gather:
            latency = LATENCY["gather"]
        else:
            latency = LATENCY.get(base, LATENCY["default"])
        done = start + latency
        chain = max(chain, done)
        for r in destination:
            ready[r] = done
    issue = max(counts["any"], counts["int"] / 0.5, counts["fp32"] / card.fp32_per_clock, counts["slow"] / 0.125,
                counts["lsu"] / 0.25)
    return LoopFacts(issue, shared, chain + BARRIER_CYCLES * barriers, min(distances) if distances else None, streams,
                     wavefronts, by_width)


def table_wavefronts(access_bytes: int, tables) -> float:
    """L1 cycles of one gather of `access_bytes` a lane: `tables` is one table's bytes, or a list of
    (table bytes, share of these gathers) where one width reads several tables, or "coalesced" (a
    row picked by a loaded index, read by consecutive lanes: as a stream), or None (unknown)."""
    if tables == "coalesced":
        return max(1.0, 32 * access_bytes / LINE_BYTES)
    if tables is None or isinstance(tables, (int, float)):
        return gather_wavefronts(access_bytes, tables)
    return sum(share * gather_wavefronts(access_bytes, size) for size, share in tables)


def gather_wavefronts(access_bytes: int, table_bytes: int | None) -> float:
    """L1 cycles of one warp's gather: 32 lanes at uniformly random entries of a `table_bytes` table
    (None: unknown, every lane its own line). The L1 looks up 4 cache-line tags a clock and its data
    stage moves 4 sectors (128 B) a clock (NVIDIA's description of Volta's L1, taken as unchanged
    through Hopper: a row for gpu_check.py to settle), so a gather takes max(distinct lines / 4, distinct sectors / 4) clocks; the expected
    number of distinct items among 32 draws from n is n (1 - (1 - 1/n)^32)."""
    if table_bytes is None:
        return 32 / TAGS_PER_CLOCK
    lines, sectors = max(1, math.ceil(table_bytes / LINE_BYTES)), max(1, math.ceil(table_bytes / SECTOR_BYTES))
    distinct = lambda n: n * (1 - (1 - 1 / n) ** 32)  # noqa: E731
    return max(1.0, distinct(lines) / TAGS_PER_CLOCK, distinct(sectors) * SECTOR_BYTES / LINE_BYTES)


def _stream_distance(lines: list, i: int, destination: list, stages: int) -> float:
    """Trips between the DRAM load at lines[i] and its first use (cyclic over the loop body)."""
    n = len(lines)
    mnemonic, operands = lines[i]
    if mnemonic.startswith("LDGSTS"):
        target = re.match(r"\s*(\[[^\]]+\])", operands)
        for step in range(1, 2 * n):
            other, other_operands = lines[(i + step) % n]
            if other.startswith("LDS") and target and target.group(1).replace(" ", "") in other_operands.replace(" ", ""):
                return step / n
        return max(1.0, stages - 1.0)  # a rotating buffer: Triton's pipeline depth
    for step in range(1, n + 1):
        other, other_operands = lines[(i + step) % n]
        if set(_split(other, other_operands)[1]) & set(destination):
            return step / n
    return max(1.0, stages - 1.0)


# ---- one launch --------------------------------------------------------------------------------------
def _fp16_accumulate(mnemonic: str) -> bool:
    """An HMMA whose accumulator is fp16 (HMMA.16816.F16), not fp32 (HMMA.16816.F32[.BF16])."""
    return mnemonic.startswith("HMMA") and ".F32" not in mnemonic


def mma_per_trip(code) -> tuple[float, float, float]:
    """(16-bit tensor FLOPs accumulating in fp32, int8 tensor ops, 16-bit FLOPs accumulating in fp16) of
    one program's loop trip, all its warps."""
    flops = ops = half = 0.0
    for mnemonic, operands in code.loop_lines:
        if mnemonic.startswith("HMMA.16816") and _fp16_accumulate(mnemonic):
            half += 4096
        elif mnemonic.startswith("HMMA.1688") and _fp16_accumulate(mnemonic):
            half += 2048
        elif mnemonic.startswith("HMMA.16816"):
            flops += 4096
        elif mnemonic.startswith("HMMA.1688"):
            flops += 2048
        elif mnemonic.startswith("IMMA.16832"):
            ops += 8192
        elif mnemonic.startswith("IMMA.16816") or mnemonic.startswith("IMMA.8816"):
            ops += 4096 if "16816" in mnemonic else 2048
        elif mnemonic.startswith("HGMMA") or mnemonic.startswith("IGMMA"):
            shape = re.search(r"64x(\d+)x(\d+)", mnemonic + operands)  # nvdisasm: HGMMA.64x64x16.F32.BF16
            work = 2 * 64 * int(shape.group(1)) * int(shape.group(2)) / 4 if shape else 0  # one warp's quarter
            if mnemonic.startswith("HGMMA"):
                flops += work
            else:
                ops += work
    return flops * code.num_warps, ops * code.num_warps, half * code.num_warps


def kernel_time(code, card_name, programs: int, trips: float, dram_bytes: float, parameters: dict | None = None,
                gather_tables: dict | None = None) -> dict:
    """Modelled microseconds of one launch of `code` (a MachineCode compiled for the card's arch) with
    `programs` programs, `trips` trips of its main loop each, moving `dram_bytes` to and from DRAM.
    `gather_tables`: {bytes a lane gathers: bytes of the table those gathers read}, what the SASS cannot
    say (a width not listed is charged as an unknown table, every lane its own line).
    Returns {"estimate_us", "breakdown": {...every bound in us, the stream distance, occupancy}}."""
    p = {**PARAMETERS, **(parameters or {})}
    spec = card(card_name)
    clock = spec.clock_ghz * 1e3  # cycles per microsecond
    per_sm = math.ceil(programs / spec.sms)
    resident = max(1, min(code.blocks_per_sm, per_sm))
    rounds = math.ceil(per_sm / resident)
    warps_per_scheduler = resident * code.num_warps / SCHEDULERS
    latency = spec.dram_latency_cycles * p["latency_scale"]
    facts = loop_facts(code, spec)
    sync_mma = HMMA_SM90_FRACTION if spec.arch == 90 and any(m.startswith(("HMMA", "IMMA")) for m, _ in code.loop_lines) else 1.0
    flops, ops, half = mma_per_trip(code)
    issue = warps_per_scheduler * facts.issue_cycles
    gathers = sum(count * table_wavefronts(width, (gather_tables or {}).get(width))
                  for width, count in (facts.gathers or {}).items())
    l1 = resident * code.num_warps * (facts.stream_wavefronts + gathers)
    shared = resident * code.num_warps * facts.shared_bytes / SHARED_BYTES_PER_CLOCK + l1
    tensor = resident * (flops / spec.tensor_flop_per_clock + ops / spec.int8_op_per_clock
                         + half / spec.fp16_accumulate_flop_per_clock) / (p["tensor_efficiency"] * sync_mma)
    # Units overlap imperfectly: the largest term plus OVERLAP of the others (0 = perfect overlap).
    units = (issue, shared, tensor)
    execute = max(max(units) + p["overlap"] * (sum(units) - max(units)), facts.chain_cycles)
    d = facts.stream_distance
    if d is None:
        trip = execute
    elif d < 1:
        trip = max(execute, latency + (1 - d) * execute)
    else:
        trip = max(execute, latency / d)
    # A split-K epilogue's sum runs in the last split of each tile alone, after the others have left:
    # its instructions are issued once, by one program, not by every program sharing a scheduler.
    last_split = getattr(code, "last_split_instructions", 0)
    outside = max(1, code.instructions - code.loop_instructions - last_split)
    outside_cycles = warps_per_scheduler * outside + latency
    round_cycles = trips * trip + outside_cycles
    compute_us = (rounds * round_cycles + last_split) / clock
    dram_us = dram_bytes / (p["bandwidth_fraction"] * spec.bandwidth_gbs * 1e3)
    estimate = max(compute_us, dram_us) + p["fixed_us"]
    breakdown = dict(
        programs_busiest_sm=per_sm, resident_programs=resident, rounds=rounds,
        issue_us=rounds * trips * issue / clock, shared_us=rounds * trips * shared / clock,
        l1_us=rounds * trips * l1 / clock,
        tensor_us=rounds * trips * tensor / clock, chain_us=rounds * trips * facts.chain_cycles / clock,
        latency_us=rounds * trips * (trip - execute) / clock if trip > execute else 0.0,
        stream_distance_trips=None if d is None else round(d, 3),
        bytes_in_flight_per_sm=None if d is None else round(resident * dram_bytes / max(1, programs) / max(trips, 1) * d),
        outside_us=rounds * outside_cycles / clock, last_split_us=last_split / clock, dram_us=dram_us,
        fixed_us=p["fixed_us"],
        bound="dram" if dram_us >= compute_us else max(
            (("latency", trip - execute), ("issue", issue), ("shared", shared), ("tensor", tensor),
             ("chain", facts.chain_cycles)), key=lambda kv: kv[1])[0])
    return {"estimate_us": estimate, "breakdown": {k: round(v, 3) if isinstance(v, float) else v for k, v in breakdown.items()}}


CUBLAS_TILES = ((128, 256), (128, 128), (64, 128), (64, 64))
CUBLAS_SPLITS = (1, 2, 4, 8, 16)


def cublas_time(card_name, m: int, n: int, k: int, parameters: dict | None = None, element_bytes: int = 2) -> dict:
    """Modelled microseconds of a bf16/fp16 GEMM C[m, n] = A[m, k] B[k, n] in cuBLAS (see the module doc):
    the best of its tile shapes and split-K factors, as its heuristics pick one, each at busiest-SM
    waves, the same tensor efficiency, bandwidth fraction and fixed cost as every kernel; split-K adds
    its fp32 partial sums' traffic and a second kernel's fixed cost."""
    p = {**PARAMETERS, **(parameters or {})}
    spec = card(card_name)
    rate = spec.tensor_flop_per_clock * p["tensor_efficiency"] * spec.clock_ghz * 1e3  # FLOP per us per SM
    best = None
    for (tile_m, tile_n), split in ((t, s) for t in CUBLAS_TILES for s in CUBLAS_SPLITS):
        if split > 1 and k // split < 256:
            continue
        tiles = math.ceil(m / tile_m) * math.ceil(n / tile_n) * split
        waves = math.ceil(tiles / spec.sms)
        rows = min(tile_m, max(16, m))  # few rows: a 16-row MMA tile (or a GEMV), not 64 padded rows
        tensor_us = waves * 2 * rows * tile_n * math.ceil(k / split) / rate
        moved = element_bytes * (n * k + m * k + m * n) + (8 * m * n * split if split > 1 else 0)
        dram_us = moved / (p["bandwidth_fraction"] * spec.bandwidth_gbs * 1e3)
        total = max(tensor_us, dram_us) + p["fixed_us"] * (2 if split > 1 else 1)
        if best is None or total < best[0]:
            best = (total, tensor_us, dram_us, waves, (tile_m, tile_n), split)
    total, tensor_us, dram_us, waves, tile, split = best
    return {"estimate_us": total,
            "breakdown": {"tensor_us": round(tensor_us, 3), "dram_us": round(dram_us, 3), "waves": waves,
                          "tile": list(tile), "split_k": split, "fixed_us": p["fixed_us"]}}


def bandwidth_us(card_name, dram_bytes: float, parameters: dict | None = None) -> float:
    """A kernel that only streams bytes (a split-K reduction, an elementwise pass): DRAM + fixed cost."""
    p = {**PARAMETERS, **(parameters or {})}
    return dram_bytes / (p["bandwidth_fraction"] * card(card_name).bandwidth_gbs * 1e3) + p["fixed_us"]
