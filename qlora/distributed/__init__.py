"""More than one process: DDP and FSDP2 (torch.distributed) launched by torchrun or accelerate.

The training code calls into this package at a few points, each a no-op for `distributed=none`:
`setup` (join the launcher's process group), `sharding.wrap` (DDP / fully_shard, before the
optimizer is built), `data.rank_micro_batches` (this rank's part of each global step),
`World.sum` (token counts and losses over ranks), `checkpoint.save_sharded` / `load_sharded` (DCP)
and `checkpoint.save_adapter` (one plain PEFT adapter, written by rank 0).
"""
from qlora.distributed.world import (STRATEGIES, PeerLostError, SilentMetrics, World, check_launch, current,
                                     setup, teardown)

__all__ = ["STRATEGIES", "PeerLostError", "SilentMetrics", "World", "check_launch", "current", "setup", "summary_fields",
           "teardown"]


def summary_fields(model, world: World) -> dict:
    """summary.json's world_size and base_bytes_per_rank (bytes of the quantized base one rank holds)."""
    from qlora.distributed.sharding import base_bytes_per_rank

    return {"world_size": world.size, "base_bytes_per_rank": base_bytes_per_rank(model)}
