"""DistributedDataParallel plumbing: joining torchrun's process group, and the trainer's own collectives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from captioner.torchrun import launch_rank


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # the trainer's own collectives' process group; None: the default one (see setup_distributed)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=device if device.type == "cuda" else "cpu")
        dist.broadcast(tensor, 0, group=self.group)
        return bool(tensor.item())

    def weights_checksums(self, module: nn.Module) -> list[torch.Tensor]:
        """Every rank's (sum, sum of squares) of ``module``'s parameters, gathered on every rank."""
        flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
        checksum = torch.stack([flat.sum(), (flat * flat).sum()])  # on the device the backend expects
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum, group=self.group)
        return gathered


def setup_distributed(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    launch = launch_rank()
    if launch.world == 1:
        return Dist()
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    info = Dist(dist.get_rank(), dist.get_world_size(), launch.local_rank)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    else:
        # Gloo's worker threads let go of a collective's tensors only after the call has returned, and need the GIL
        # for it. DDP keeps the default group, and so its threads, alive to interpreter exit, past
        # destroy_process_group: a rank that exited right after the checksum all_gather could be aborted in such a
        # thread ("terminate called without an active exception"). So the trainer's own collectives (tensors made
        # in Python; DDP's buckets are not) get a group of their own, which teardown_distributed frees, joining its
        # threads.
        info.group = dist.new_group(backend="gloo")
    return info


def teardown_distributed(info: Dist) -> None:
    """Leave the process group ``setup_distributed`` joined."""
    if info.world > 1:
        dist.destroy_process_group()
        info.group = None  # the last reference: freeing it waits for its gloo threads to finish
