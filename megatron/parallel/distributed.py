"""Process-group set-up from the launcher's environment, and the few collectives the trainer needs.

Launchers name ranks differently: torchrun and the `deepspeed` launcher (its default pdsh path and
a single-node run both go through deepspeed/launcher/launch.py) set RANK/WORLD_SIZE/LOCAL_RANK and
MASTER_ADDR/MASTER_PORT, SLURM sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and `deepspeed
--launcher openmpi` (mpirun) sets OMPI_COMM_WORLD_*. Everything else in the package asks this module,
never the environment.

The rendezvous and every collective wait at most `distributed_timeout_minutes` (sub-groups too, when
their mesh is built with `subgroup_backend_override`): a rank that dies or hangs makes the others fail
with an error that `describe_failure` turns into one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_RANK_VARIABLES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from whichever launcher set them; (0, 1, 0) when none did."""
    env = dict(os.environ) if env is None else env
    for rank_key, size_key, local_key in _RANK_VARIABLES:
        if rank_key in env and size_key in env:
            return int(env[rank_key]), int(env[size_key]), int(env.get(local_key, 0))
    return 0, 1, 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no CUDA device is available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


_timeout_minutes: float | None = None  # as given to the live process group, for describe_failure
_checkpoint_group: dist.ProcessGroup | None = None  # gloo over every rank, for background checkpoint saves only


def init_distributed(device: str = "auto", timeout_minutes: float = 10.0) -> DistInfo:
    """Joins the process group when launched with several ranks (gloo on CPU, NCCL on GPU).

    `timeout_minutes` bounds the rendezvous and every collective on the default group: when another
    rank dies or hangs, this one raises (gloo) or is torn down by the NCCL watchdog instead of waiting.
    """
    global _timeout_minutes
    if timeout_minutes <= 0:
        raise ValueError(f"distributed_timeout_minutes must be positive, got {timeout_minutes}")
    rank, world_size, local_rank = ranks_from_env()
    torch_device = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        _timeout_minutes = timeout_minutes  # before the rendezvous, which can time out too
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes))
        add_checkpoint_group(timeout_minutes)
    return DistInfo(rank, world_size, local_rank, torch_device)


def add_checkpoint_group(timeout_minutes: float = 10.0) -> None:
    """Builds `checkpoint_group()`; a collective: every rank calls it (init_distributed does)."""
    global _checkpoint_group
    if _checkpoint_group is None:
        _checkpoint_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))


def checkpoint_group() -> dist.ProcessGroup | None:
    """A gloo group of every rank that only DCP's asynchronous saves use (None before init_distributed).

    An async save runs its collectives (planning, commit) from a background thread while training goes on.
    On the default group they interleave with training's own collectives (FSDP2's all-gathers, DDP's
    all-reduces) and gloo fails with "Received data size doesn't match expected size"; and under NCCL the
    default group has no CPU backend, which async save refuses ("A CPU backend must be enabled for async
    save"). A group of its own avoids both, as torchtitan does.
    """
    return _checkpoint_group


def subgroup_backend_override(mesh_shape: tuple[int, ...], mesh_dim_names: tuple[str, ...]) -> dict | None:
    """`backend_override` for `init_device_mesh` that gives a mesh's sub-groups this run's timeout.

    torch builds the sub-groups of a mesh dimension smaller than the world with the backend's default
    timeout (gloo 30 min, NCCL 10 min), not the default group's; options carrying `_timeout` fix that.
    Dimensions spanning the world reuse the default group and are left alone. None before init.
    """
    if _timeout_minutes is None or not dist.is_initialized():
        return None
    backend = dist.get_backend()
    options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    options._timeout = timedelta(minutes=_timeout_minutes)
    world_size = dist.get_world_size()
    return {name: (backend, options) for size, name in zip(mesh_shape, mesh_dim_names) if size != world_size}


_TIMEOUT_WORDS = ("timed out", "timeout", "time out")
_LOST_PEER_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
                    "socket closed")


def describe_failure(err: BaseException) -> str | None:
    """One line for an error that says another rank timed out or went away; None for any other error.

    Only errors raised while a multi-rank group is (or was) up qualify, so a local bug is never
    mistaken for a lost peer.
    """
    if _timeout_minutes is None or not isinstance(err, RuntimeError):
        return None
    text = str(err)
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    lowered = text.lower()
    rank = ranks_from_env()[0]
    if any(word in lowered for word in _TIMEOUT_WORDS):
        return (f"rank {rank}: distributed error: a collective or the rendezvous waited longer than "
                f"distributed_timeout_minutes={_timeout_minutes:g}; another rank died or hangs (backend: {first_line})")
    if any(word in lowered for word in _LOST_PEER_WORDS):
        return (f"rank {rank}: distributed error: lost the connection to another rank, which probably died; "
                f"see its output above (backend: {first_line})")
    return None


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    global _checkpoint_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _checkpoint_group = None
