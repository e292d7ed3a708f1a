"""Process-group set-up from the launcher's environment, and the few collectives the trainer needs.

Launchers name ranks differently: torchrun and the `deepspeed` launcher (its default pdsh path and
a single-node run both go through deepspeed/launcher/launch.py) set RANK/WORLD_SIZE/LOCAL_RANK and
MASTER_ADDR/MASTER_PORT, SLURM sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and `deepspeed
--launcher openmpi` (mpirun) sets OMPI_COMM_WORLD_*. Everything else in the package asks this module,
never the environment.

The rendezvous and every collective wait at most `distributed_timeout_minutes` (sub-groups too, when
their mesh is built with `subgroup_backend_override`): a rank that dies or hangs makes the others fail
with an error that `describe_failure` turns into one line, naming the ranks that did not arrive.

How a missing rank is named, at no cost while training runs: each rank writes its host and pid to the
rendezvous store once, at start. Only when a collective has failed does a rank write a record saying where
it gave up (the torch.distributed call, its caller, the training step), and wait a little
(`peer_wait_seconds`) for the other ranks' records: the ranks without one are the ones that never came (dead,
stopped, or stuck outside any collective). The store is the launcher's (torchrun's agent) or rank 0's
(SLURM, mpirun); a store that does not answer is itself named. `torch.distributed.monitored_barrier` was
the other candidate: it names late ranks on rank 0 only, needs a healthy gloo group after the timeout, and
waits on rank 0, which may be the hung one.

On NCCL the timeout is seen by NCCL's watchdog thread, which (torchrun's TORCH_NCCL_ASYNC_ERROR_HANDLING=1)
ends the process before Python sees an error, so no record is written there; instead NCCL's flight recorder
is switched on (TORCH_FR_BUFFER_SIZE=2000 and TORCH_NCCL_DUMP_ON_TIMEOUT=1 unless set): each rank dumps its
last collectives on a timeout, and `python -m torch.distributed.flight_recorder.fr_trace DIR` names the
ranks that did not join (docs/robustness.md).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

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
        if backend == "nccl":  # NCCL's own record of the last collectives, dumped on a timeout (module docstring)
            os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
            os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        _timeout_minutes = timeout_minutes  # before the rendezvous, which can time out too
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes))
        add_checkpoint_group(timeout_minutes)
        register_rank(dist.distributed_c10d._get_default_store(), rank, world_size)
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

    Only errors raised while a multi-rank group is (or was) up qualify, so a local bug is never mistaken for
    a lost peer. The line says where this rank gave up and, from the ranks' records in the store, which
    ranks (host, pid) never arrived; gathering them takes up to `peer_wait_seconds()`.
    """
    if _timeout_minutes is None or not isinstance(err, RuntimeError):
        return None
    text = str(err)
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    lowered = text.lower()
    rank = ranks_from_env()[0]
    timed_out = any(word in lowered for word in _TIMEOUT_WORDS)
    if not timed_out and not any(word in lowered for word in _LOST_PEER_WORDS):
        return None
    where = f"{failed_call(err)}, {_activity}"
    peers = consult_peers(where)
    if timed_out:
        what = (f"a collective or the rendezvous waited longer than distributed_timeout_minutes={_timeout_minutes:g} "
                f"({where})")
        fallback = "another rank died or hangs"
    else:
        what = f"lost the connection to another rank, which probably died ({where})"
        fallback = "see its output above"
    return f"rank {rank}: distributed error: {what}; {peers.describe(where) or fallback} (backend: {first_line})"


# -- naming the ranks that did not arrive ------------------------------------------------------------------------

_store: dist.Store | None = None  # the default group's store, kept after the group is destroyed, for the report
_store_prefix = "megatron"
_rank_and_world = (0, 1)
_activity = "before the first step"  # what this rank was doing, as the failure report says it
_report: PeerReport | None = None  # this process's one report: its record is written once


def register_rank(store: dist.Store, rank: int, world_size: int) -> None:
    """Writes this rank's host and pid to the rendezvous store, once, so that a rank that later fails to arrive
    can be named with them. A collective (every rank calls it): the keys carry a name rank 0 draws for this group,
    as torchrun's agent keeps its store across the groups it forms (restarts, nodes joining)."""
    global _store, _store_prefix, _rank_and_world, _report
    name = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    _store, _rank_and_world, _store_prefix, _report = store, (rank, world_size), f"megatron/{name[0]}", None
    _append_record(store, "ranks", {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()})


def _append_record(store: dist.Store, key: str, record: dict) -> None:
    """Records go to one key per kind, a JSON line each, so one read gets every rank's (however many ranks)."""
    store.append(f"{_store_prefix}/{key}", json.dumps(record) + "\n")


def _read_records(store: dist.Store, key: str) -> dict[int, dict]:
    """rank -> record, of the records under `key` (none when no rank wrote one: `check` does not wait)."""
    full_key = f"{_store_prefix}/{key}"
    if not store.check([full_key]):
        return {}
    records = (json.loads(line) for line in store.get(full_key).decode().splitlines() if line.strip())
    return {record["rank"]: record for record in records}


def note_activity(what: str) -> None:
    """What this rank is doing now ("training step 12", "saving the checkpoint of step 10"), for the failure
    report: one assignment, cheap enough to call every step."""
    global _activity
    _activity = what


def peer_wait_seconds() -> float:
    """How long a failed rank waits for the others' records: ranks that gave up at the same collective do so
    within moments of each other, a rank that waited elsewhere within about a step. Bounded, as every rank
    that failed waits this long before it exits."""
    return min(15.0, max(2.0, (_timeout_minutes or 0.0) * 60 / 20))


_TORCH_DIR = str(Path(torch.__file__).parent)
_REPO = Path(__file__).resolve().parents[2]


def failed_call(err: BaseException) -> str:
    """The torch.distributed function that raised and its nearest caller outside torch, from the traceback:
    "all_reduce from megatron/parallel/distributed.py:250 (all_reduce_mean)". A collective run by autograd
    (DDP's gradient all-reduce) has no Python frame of its own: then only the caller is named."""
    frames = traceback.extract_tb(err.__traceback__)
    collective = next((frame.name for frame in reversed(frames)
                       if frame.filename.endswith("distributed_c10d.py") and not frame.name.startswith("_")), None)
    caller = next((frame for frame in reversed(frames) if not frame.filename.startswith(_TORCH_DIR)), None)
    where = ""
    if caller is not None:
        path = Path(caller.filename)
        shown = path.relative_to(_REPO) if path.is_relative_to(_REPO) else path.name
        where = f"{shown}:{caller.lineno} ({caller.name})"
    if collective and where:
        return f"{collective} from {where}"
    return collective or (f"in {where}" if where else "in an unknown call")


@dataclass
class PeerReport:
    """What the store says about the other ranks after this one gave up."""

    gave_up: dict[int, dict] = field(default_factory=dict)  # rank -> its record (host, pid, where it gave up)
    missing: dict[int, dict] = field(default_factory=dict)  # rank -> its start-up record (host, pid), {} if none
    problem: str | None = None  # why the store could not be consulted

    def describe(self, my_where: str) -> str:
        """"rank 1 (host h, pid 7) did not arrive: it hangs or died", and where other ranks gave up instead."""
        if self.problem:
            return self.problem
        parts = []
        if self.missing:
            named = ", ".join(_name(rank, record) for rank, record in sorted(self.missing.items()))
            plural = len(self.missing) > 1
            parts.append(f"rank{'s' if plural else ''} {named} did not arrive within {peer_wait_seconds():g}s "
                         f"of this rank giving up: {'they hang' if plural else 'it hangs'} or died")
        elsewhere = [f"rank {rank} at {record.get('where')}" for rank, record in sorted(self.gave_up.items())
                     if record.get("where") != my_where]
        if elsewhere:
            parts.append("gave up elsewhere: " + ", ".join(elsewhere))
        if self.gave_up and not self.missing:
            parts.append(f"no rank is missing: all {len(self.gave_up) + 1} gave up (a network fault, or ranks that "
                         "called different collectives)")
        return "; ".join(parts)


def _name(rank: int, record: dict) -> str:
    return f"{rank} (host {record['host']}, pid {record['pid']})" if record else f"{rank} (host unknown)"


def consult_peers(where: str) -> PeerReport:
    """Writes where this rank gave up and collects the other ranks' records, all within `peer_wait_seconds`
    (plus a margin): the store's client can block without a timeout when the store's process is stopped, so
    the talking happens on a daemon thread and an unanswered store is reported instead. Once per process."""
    global _report
    if _report is not None:
        return _report
    if _store is None:  # the rendezvous itself failed: no store to ask
        return PeerReport()
    report = PeerReport()
    wait = peer_wait_seconds()
    worker = threading.Thread(target=_gather_records, args=(_store, where, wait, report), daemon=True)
    worker.start()
    worker.join(wait + 3.0)
    if worker.is_alive():
        host = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        report = PeerReport(problem=f"the rendezvous store at {host} did not answer within {wait + 3.0:g}s: the "
                                    "process holding it (rank 0, or torchrun's agent on the first node) hangs or died")
    elif _rank_and_world[0] == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        _keep_store_up(_store, wait + 2.0)
    _report = report
    return report


def _keep_store_up(store: dist.Store, most: float) -> None:
    """Rank 0 holds the store (no torchrun agent does): it stays until every rank that gave up has read the
    records, at most `most` seconds, so that a rank that gave up a little later still gets its answer."""
    deadline = time.monotonic() + most
    while time.monotonic() < deadline:
        if store.add(f"{_store_prefix}/read_count", 0) >= store.add(f"{_store_prefix}/gave_up_count", 0):
            return
        time.sleep(0.1)


def _gather_records(store: dist.Store, where: str, wait: float, report: PeerReport) -> None:
    rank, world_size = _rank_and_world
    count_key = f"{_store_prefix}/gave_up_count"
    try:
        _append_record(store, "gave_up", {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                                          "where": where})
        arrived, deadline = store.add(count_key, 1), time.monotonic() + wait
        while arrived < world_size and time.monotonic() < deadline:  # stops early when every rank wrote one
            time.sleep(0.1)
            arrived = store.add(count_key, 0)
        gave_up, started = _read_records(store, "gave_up"), _read_records(store, "ranks")
        report.gave_up = {other: record for other, record in gave_up.items() if other != rank}
        report.missing = {other: started.get(other, {}) for other in range(world_size) if other not in gave_up}
        store.add(f"{_store_prefix}/read_count", 1)
    except Exception as err:  # a broken store: say so rather than nothing
        report.problem = f"the rendezvous store could not be read ({type(err).__name__}: {str(err)[:120]})"


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
