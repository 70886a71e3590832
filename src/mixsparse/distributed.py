"""Several processes (e.g. one per GPU, started by ``torchrun``) sharing one MSP search.

Every rank loads the model, builds the same level cache and runs the same seeded search; only the
fitness evaluations are dealt out (:meth:`mixsparse.search.Fitness.prefetch`) and their scores
all-gathered, so all ranks follow one trajectory and rank 0 writes the outputs. Nothing here runs
unless ``WORLD_SIZE`` > 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Workers:
    rank: int
    world: int
    device: torch.device | None  # this rank's GPU (None: keep the configured device)
    group: object  # the torch.distributed process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def share_flag(workers: Workers, flag: bool | None) -> bool:
    """Rank 0's ``flag``, on every rank (the others pass None and wait for it)."""
    import torch.distributed as dist

    obj = [flag]
    dist.broadcast_object_list(obj, src=0, group=workers.group)
    return bool(obj[0])


def from_env() -> Workers | None:
    """Join the process group described by torchrun's environment variables, or return None for a
    single process. NCCL with one GPU per rank (``LOCAL_RANK``) when CUDA is present, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        raise ConfigError("WORLD_SIZE > 1 but no MASTER_ADDR: start several processes with torchrun, e.g. "
                          "torchrun --standalone --nproc_per_node=4 -m mixsparse search ...")
    device = None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # generous timeout: non-main ranks wait while rank 0 builds a SparseGPT level database (many minutes)
        import datetime

        dist.init_process_group("nccl" if device is not None else "gloo", timeout=datetime.timedelta(hours=6))
    return Workers(dist.get_rank(), dist.get_world_size(), device, dist.group.WORLD)


def shutdown(workers: Workers | None) -> None:
    if workers is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
