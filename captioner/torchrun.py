"""Where this process stands in a ``torchrun`` launch: read once from the environment torchrun sets.

``captioner caption`` shares images by rank, and ``captioner-train`` joins the process group and logs on rank 0
only; both ask :func:`launch_rank`, the one place that reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.
Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from captioner.errors import CaptionerError


class LaunchError(CaptionerError, ValueError):
    """``RANK``, ``WORLD_SIZE`` or ``LOCAL_RANK`` hold values no launch could have set."""


@dataclass(frozen=True)
class LaunchRank:
    rank: int  # this process among all of them, 0 .. world - 1
    world: int  # processes in the launch; 1 without torchrun
    local_rank: int  # this process among those on its machine (the GPU it takes)

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, merges and saves."""
        return self.rank == 0


def launch_rank() -> LaunchRank:
    """This process's place in a ``torchrun`` launch; rank 0 of 1 without one."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    texts = [os.environ.get(name, default) for name, default in zip(names, ("0", "1", "0"), strict=True)]
    try:
        rank, world, local_rank = (int(text) for text in texts)
    except ValueError:
        given = ", ".join(f"{name}={text!r}" for name, text in zip(names, texts, strict=True))
        raise LaunchError(f"torchrun's variables must be integers: {given}") from None
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < world:
        raise LaunchError(f"RANK={rank} and WORLD_SIZE={world} do not make sense together (LOCAL_RANK={local_rank})")
    return LaunchRank(rank, world, local_rank)
