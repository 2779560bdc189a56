"""The process group a run belongs to: set up from the launcher's environment, or a single process.

torchrun and `accelerate launch` both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; that is all a process needs to join its peers (env:// rendezvous). The backend is gloo
on CPU and nccl on CUDA. Every collective waits at most `distributed.timeout_s`: a peer that died
makes the others fail with a message naming the lost peer instead of waiting forever.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from qlora.errors import UserError
from qlora.train.schema import ConfigError

STRATEGIES = ("none", "ddp", "fsdp2")
_LAUNCH = ("torchrun --nproc_per_node=<N> train.py {args}  "
           "(or: accelerate launch --num_processes <N> train.py {args})")


class PeerLostError(UserError, RuntimeError):
    """Another process of the run stopped answering (it died, or its machine is unreachable)."""


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun / accelerate launch exported it (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_launch(strategy: str) -> None:
    """One-line ConfigErrors for a strategy and a launch that do not fit together."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}; "
                          "set distributed=none, distributed=ddp or distributed=fsdp2")
    size = launched_world_size()
    if strategy != "none" and "RANK" not in os.environ:
        raise ConfigError(f"distributed={strategy} needs one process per device, started by a launcher: "
                          + _LAUNCH.format(args=f"... distributed={strategy}"))
    if strategy == "none" and size > 1:
        raise ConfigError(f"launched as {size} processes (WORLD_SIZE={size}) but distributed=none: each would train "
                          "alone on the same data; add distributed=ddp or distributed=fsdp2")


@dataclass
class World:
    """This process's place in the run: rank, size, device and the collectives the trainer needs."""

    strategy: str = "none"
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    def sum(self, value: float) -> float:
        """The sum of `value` over all ranks (fp64, so token counts up to 2^53 stay exact)."""
        if not self.active:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
        with self.guard("summing a step's token counts and losses"):
            dist.all_reduce(tensor)
        return tensor.item()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a picklable object: a path, a decision)."""
        if not self.active:
            return value
        box = [value]
        with self.guard("receiving rank 0's decision"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_keys(self, keys: list[str]) -> set[str]:
        """The union of every rank's `keys` (what a checkpoint must contain)."""
        if not self.active:
            return set(keys)
        every: list = [None] * self.size
        with self.guard("collecting checkpoint keys"):
            dist.all_gather_object(every, keys)
        return {k for part in every for k in part}

    def barrier(self, why: str) -> None:
        if self.active:
            with self.guard(why):
                dist.barrier()

    @contextlib.contextmanager
    def guard(self, doing: str):
        """Turn a collective's failure (a peer gone, a timeout) into one PeerLostError naming it."""
        try:
            yield
        except Exception as err:
            lost = self.peer_lost(err, doing)
            if lost is None:
                raise
            raise lost from err

    def peer_lost(self, err: BaseException, doing: str = "training") -> Optional[PeerLostError]:
        """The PeerLostError `err` means, if it is a communication failure (else None): collectives
        inside FSDP2's forward and backward fail with gloo's / nccl's own errors."""
        if not self.active or isinstance(err, PeerLostError) or not _is_communication_error(err):
            return None
        first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return PeerLostError(
            f"rank {self.rank} of {self.size} lost contact with its peers while {doing} (each wait is bounded by "
            f"distributed.timeout_s={self.timeout_s:.0f}): another process of this run died or hangs, its own log "
            f"says why; resume with trainer.resume=true. ({type(err).__name__}: {first_line})"
        )


_COMMUNICATION_SIGNS = ("gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset", "Broken pipe",
                        "timed out", "Timed out", "Socket", "socket", "peer")


def _is_communication_error(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(sign in str(err) for sign in _COMMUNICATION_SIGNS)


def _collective_device() -> torch.device:
    # nccl collectives take CUDA tensors; gloo takes CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_CURRENT = World()


def current() -> World:
    """The World `setup` made in this process (a single process before or without it)."""
    return _CURRENT


def setup(strategy: str, device: Optional[str], timeout_s: float) -> World:
    """Join the launcher's process group (or stay a single process for strategy none); the result
    is also what `current()` returns from then on."""
    global _CURRENT
    _CURRENT = _join(strategy, device, timeout_s)
    return _CURRENT


def _join(strategy: str, device: Optional[str], timeout_s: float) -> World:
    check_launch(strategy)
    if strategy == "none":
        return World()
    if timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be > 0, got {timeout_s}")
    rank, size = int(os.environ["RANK"]), launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return World(strategy, rank, size, local_rank, local_size, timeout_s)


def teardown(world: World) -> None:
    global _CURRENT
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = World()


class SilentMetrics:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl and wandb for the run)."""

    wandb_dir = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_text(self, key: str, rows: list, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass
