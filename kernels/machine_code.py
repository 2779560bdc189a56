"""What a kernel compiled by launch.compile_only() costs on the GPU, read from its cubin with the
cuobjdump and nvdisasm that ship in the triton wheel: registers, spills, shared memory, and the
SASS instruction mix (tensor-core MMAs, global loads).

These are static facts, not timings; they catch on a CPU machine what would make a kernel slow
or unlaunchable on the GPU: local-memory spills, shared memory past the per-block limit, register
counts that leave too few warps per SM, a tl.dot that missed the tensor cores, or a decode that
issues several load instructions per weight element.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Per-SM register file and per-block shared memory opt-in limit, by CUDA architecture.
REGISTERS_PER_SM = 65536
MAX_SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_THREADS_PER_SM = {80: 2048, 86: 1536, 89: 1536, 90: 2048}
# SASS opcodes that read global memory: plain loads, async global->shared copies, and TMA.
GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG")
TENSOR_CORE_MMAS = ("HMMA", "HGMMA")
_SASS_OPCODE = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)", re.MULTILINE)
_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9.]*)(.*)$|^(\.L_x_\d+):", re.MULTILINE)


@dataclass
class MachineCode:
    arch: int
    registers: int  # per thread
    shared_bytes: int  # per block, static + the dynamic amount Triton launches with
    local_bytes: int  # per thread; > 0 means spilled registers (or a stack array) in slow local memory
    num_warps: int
    opcodes: dict  # SASS opcode -> count in the kernel text (loop bodies once, unrolled code per copy)
    loop_opcodes: dict = dataclasses.field(default_factory=dict)  # the same, inside the main loop only
    mma_shapes: dict = dataclasses.field(default_factory=dict)  # e.g. "HMMA.16816.F32.BF16" -> count, whole text
    # The main loop's instructions in program order, (full mnemonic, operands): what a latency model
    # reads dependency chains and prefetch distances from (benchmarks/gpu_model.py).
    loop_lines: list = dataclasses.field(default_factory=list)
    num_stages: int = 1  # Triton's software-pipelining depth the kernel was compiled with
    # Instructions only the last split of a split-K tile runs (last_split_instructions): past the
    # exit of the splits that are not last. The model charges them once, not to every program.
    last_split_instructions: int = 0

    @property
    def instructions(self) -> int:
        return sum(self.opcodes.values())

    @property
    def loop_instructions(self) -> int:
        return sum(self.loop_opcodes.values())

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM allowed by registers, shared memory and threads (the tightest)."""
        threads = 32 * self.num_warps
        by_regs = REGISTERS_PER_SM // max(1, self.registers * threads)
        by_threads = MAX_THREADS_PER_SM.get(self.arch, 2048) // threads
        # An SM holds 1 KB more shared memory than one block may take (228 KB vs 227 KB on sm_90);
        # shared_bytes already counts the 1 KB every block reserves.
        by_shared = (MAX_SHARED_PER_BLOCK.get(self.arch, 99 * 1024) + 1024) // self.shared_bytes if self.shared_bytes else by_threads
        return min(by_regs, by_threads, by_shared)

    def count(self, opcodes: tuple[str, ...]) -> int:
        """Instructions whose opcode is exactly one of `opcodes` (LDG counts LDG, not LDGSTS)."""
        return sum(n for op, n in self.opcodes.items() if op in opcodes)


def machine_code(compiled_kernel, arch: int) -> MachineCode:
    """Resource usage and SASS opcode counts of a triton CompiledKernel built for sm_<arch>."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled_kernel.asm["cubin"])
        usage = _run(knobs.nvidia.cuobjdump.path, "-res-usage", str(cubin))
        sass = _run(knobs.nvidia.nvdisasm.path, str(cubin))
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage for {compiled_kernel.metadata.name}:\n{usage}")
    return MachineCode(
        arch=arch,
        registers=int(fields["REG"]),
        shared_bytes=int(fields.get("SHARED", 0)) + int(compiled_kernel.metadata.shared),
        local_bytes=int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
        num_warps=int(compiled_kernel.metadata.num_warps),
        opcodes=dict(collections.Counter(_SASS_OPCODE.findall(sass))),
        loop_opcodes=main_loop_opcodes(sass),
        loop_lines=main_loop_lines(sass),
        num_stages=int(getattr(compiled_kernel.metadata, "num_stages", 1) or 1),
        last_split_instructions=last_split_instructions(sass),
        mma_shapes=dict(collections.Counter(m.split()[0] for m in re.findall(r"\b(H?G?MMA\.[A-Za-z0-9.]+)", sass))),
    )


def main_loop_opcodes(sass: str) -> dict:
    return dict(collections.Counter(mnemonic.split(".")[0] for mnemonic, _ in main_loop_lines(sass)))


def main_loop_lines(sass: str) -> list:
    """(mnemonic, operands) of the kernel's main loop: the longest span from a label back-branched to.

    nvdisasm writes labels as `.L_x_<n>:` and a loop's closing branch as `BRA `(.L_x_<n>)`; a
    branch to a label printed above it closes a loop. The 4-bit kernels have one K loop (plus
    short loops in reductions), so the longest span is the K loop; {} when there is none.
    """
    lines, labels, best = [], {}, (0, 0)
    for match in _SASS_LINE.finditer(sass):
        opcode, operands, label = match.groups()
        if label:
            labels[label] = len(lines)
            continue
        base = opcode.split(".")[0]
        lines.append((opcode, operands.strip().rstrip(";").strip()))
        if base == "BRA":
            target = re.search(r"(\.L_x_\d+)", operands)
            if target and target.group(1) in labels:
                start = labels[target.group(1)]
                if len(lines) - start > best[1] - best[0]:
                    best = (start, len(lines))
    return lines[best[0]:best[1]]


_SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9.]*)", re.MULTILINE)


def last_split_instructions(sass: str) -> int:
    """Instructions of a split-K epilogue that only the last split to arrive runs: those after the
    first predicated EXIT that follows the arrival counter's atomic add (the splits that are not
    last leave there), up to the kernel's last unconditional EXIT. 0 where there is no such exit
    (one split, or a kernel that adds its partial sums atomically and leaves)."""
    instructions = _SASS_INSTRUCTION.findall(sass)
    counter = next((i for i, (_, op) in enumerate(instructions) if op.startswith("ATOM") and ".ADD" in op), None)
    if counter is None:
        return 0
    leave = next((i for i in range(counter + 1, len(instructions))
                  if instructions[i][1] == "EXIT" and instructions[i][0]), None)
    end = max((i for i, (predicate, op) in enumerate(instructions) if op == "EXIT" and not predicate), default=None)
    if leave is None or end is None or end <= leave:
        return 0
    return end - leave


def _run(tool: str, *args: str) -> str:
    result = subprocess.run([tool, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(tool).name} {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout
