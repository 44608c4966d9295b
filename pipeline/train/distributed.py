"""Training on several processes (``torchrun --nproc_per_node N``): who this process is, its
device, and the few collective calls the loop needs.

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous address) in
every process; without them training is one process, as always. Each rank uses
``cuda:LOCAL_RANK`` (NCCL; ``cuda:0`` where the launcher gives each rank its own GPU) or the
CPU (gloo), holds ``train.batch_size / WORLD_SIZE`` samples
of every global batch, and only rank 0 writes files and prints.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.errors import InputError
from pipeline.runtime import resolve_device

# Rank 0 may decode the image cache while the others wait at a barrier: minutes, not seconds.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def ranks_from_env() -> Ranks:
    """``Ranks`` from torchrun's environment; one process when ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device_name: str) -> tuple[Ranks, torch.device]:
    """Join the process group when torchrun started this process (once per process; later calls
    reuse it) and pick this rank's device.

    Returns: (ranks, device): ``cuda:LOCAL_RANK`` for a CUDA run of several processes (``cuda:0``
    where each process sees one GPU), else ``resolve_device(device_name)``.
    """
    ranks = ranks_from_env()
    device = resolve_device(device_name)
    if not ranks.enabled:
        return ranks, device
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if visible == 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) == 1:
            index = 0          # a launcher that gives each rank its own GPU (srun --gpus-per-task=1)
        elif ranks.local_rank < visible:
            index = ranks.local_rank
        else:
            raise InputError(None, f"LOCAL_RANK {ranks.local_rank} but torch sees {visible} "
                                   f"GPU(s): start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # device_id binds NCCL to this rank's GPU (barriers then know it, without a warning)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                **({"device_id": device} if device.type == "cuda" else {}))
    if dist.get_world_size() != ranks.world_size:
        raise RuntimeError(f"process group of {dist.get_world_size()} processes, WORLD_SIZE {ranks.world_size}")
    return ranks, device


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (nothing in a one-process run)."""
    if ranks.enabled:
        dist.barrier()


def all_sum(tensor: Tensor, ranks: Ranks) -> Tensor:
    """The element-wise sum of ``tensor`` over the ranks (in place; itself in a one-process run)."""
    if ranks.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def teardown(ranks: Ranks) -> None:
    """Leave the process group (after a final barrier, so no rank exits while rank 0 writes)."""
    if ranks.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
