"""torch.distributed plumbing for data-parallel runs: who am I, start the group under torchrun, sum.

Nothing here starts a process group on its own inside a library call: :func:`evaluate_lenses`
shards only when the caller (or ``torchrun`` through the CLI's :func:`init_from_env`) has
initialised one.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# seconds a collective waits for the other ranks before it fails (torch's own default is 30 minutes for
# gloo and, without async error handling, forever for nccl); TL_LOGITLENS_TIMEOUT_S overrides it
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "TL_LOGITLENS_TIMEOUT_S"


class DistributedError(RuntimeError):
    """A collective failed: another rank stopped, was killed, or did not answer within the timeout. Its
    message is one line, naming this rank and what it was doing."""


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits (``TL_LOGITLENS_TIMEOUT_S`` seconds, default 1800).

    Raises:
        ValueError: the variable is not a positive number of seconds.
    """
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 10**7:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds above 0 (the collectives' timeout)")
    return datetime.timedelta(seconds=seconds)


def _collective(what: str, world: World, call: Callable[[], Any]) -> Any:
    """Run one collective; any failure (a peer killed: gloo's connection errors; a peer stopped: the
    timeout) becomes a one-line :class:`DistributedError`."""
    try:
        return call()
    except Exception as err:  # gloo and nccl raise RuntimeError/DistBackendError with C++ context
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"rank {world.rank} of {world.size}: {what} failed, so another rank stopped, was killed or did not "
            f"answer within {collective_timeout().total_seconds():g} s ({TIMEOUT_ENV}); every rank stops ({first})"
        ) from None


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes (``size == 1``: no process group)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Documents are dealt round-robin: document ``index`` belongs to rank ``index % size``."""
        return index % self.size == self.rank


def current_world() -> World:
    """The initialised process group's rank and size, or a world of one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_from_env(device: str | None) -> tuple[World, str | None]:
    """Under ``torchrun``, start the process group (nccl for CUDA, gloo otherwise) and pick this
    rank's device; outside it, do nothing. Returns the world and the device to load the model on."""
    if not launched_by_torchrun():
        return World(), device
    dist = torch.distributed
    local = int(os.environ["LOCAL_RANK"])
    cuda = (device is None or device.startswith("cuda")) and torch.cuda.is_available()
    if cuda:
        if device not in (None, "cuda") and ":" in device:
            raise ValueError(
                f"--device {device} names one GPU, but torchrun gives each rank its own; pass --device cuda"
            )
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=collective_timeout())
    return current_world(), device


def sum_over_ranks(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of ``tensor`` over every rank, added in rank order so every rank gets the same bits.

    Each rank's tensor is gathered (an all-gather, not an all-reduce, whose order of addition the
    backend chooses) and summed 0, 1, 2, ... on every rank.
    """
    if world.size == 1:
        return tensor
    dist = torch.distributed
    device = tensor.device
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    local = tensor.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(world.size)]
    _collective("summing over the ranks", world, lambda: dist.all_gather(parts, local))
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total.to(tensor.device)


def broadcast_error(message: str | None, world: World) -> str | None:
    """Share a first error message across ranks, so that every rank stops with the same error
    instead of the others waiting forever in a collective."""
    if world.size == 1:
        return message
    dist = torch.distributed
    box: list[str | None] = [message]
    gathered: list[list[str | None] | None] = [None] * world.size
    _collective("sharing the ranks' errors", world, lambda: dist.all_gather_object(gathered, box))
    for item in gathered:
        if item is not None and item[0] is not None:
            return item[0]
    return None
