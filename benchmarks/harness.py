"""What the timing benchmarks share: spawned gloo ranks, variants interleaved round by round with medians, and a
timed stand-in for a dispatcher's all_to_all.

- `spawn_gloo_ranks` runs a function on N local processes joined in one gloo group (a file:// store, one thread
  each) and returns what each rank returned.
- `interleaved` runs every variant once per round, after warm-up rounds that are dropped, so a drift in the
  machine's speed falls on all variants alike; `medians` takes each numeric key's median over the rounds.
- `TimedAllToAll` does what megatron.parallel.expert_parallel.all_to_all does (differentiable, its backward the
  reverse exchange) and reports each exchange, forward and backward apart. A benchmark sets it on a dispatcher
  instance (`dispatcher.all_to_all = TimedAllToAll(note)`), so the package's module stays as it is.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.parallel.expert_parallel import exchange_rows


def _rank_entry(rank: int, world: int, folder: str, rank_main: Callable[..., dict], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        result = rank_main(rank, world, *args)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn_gloo_ranks(rank_main: Callable[..., dict], world: int, *args: Any) -> list[dict]:
    """`rank_main(rank, world, *args)` on `world` spawned processes in one gloo group; their JSON-able results.
    `rank_main` must be a module-level function (the processes are spawned, not forked)."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_entry, args=(world, folder, rank_main, args), nprocs=world, join=True)
        return [json.loads(Path(folder, f"rank{rank}.json").read_text()) for rank in range(world)]


def interleaved(step: Callable[[str], dict], names: Iterable[str], repeats: int, warmup: int) -> dict[str, list[dict]]:
    """`step(name)` for every name once per round, `warmup` rounds (dropped) then `repeats` rounds (kept)."""
    names = list(names)
    records: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        for name in names:
            record = step(name)
            if round_index >= warmup:
                records[name].append(record)
    return records


def medians(records: list[dict]) -> dict[str, float]:
    """The median over the records of each numeric key of the first one (other keys are left out)."""
    keys = [k for k, v in records[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {key: statistics.median(record[key] for record in records) for key in keys}


@dataclass(frozen=True)
class Exchange:
    """One timed all_to_all: its phase (fwd or bwd), seconds on the wire and waiting at the barrier before it
    (0 without one), the rows this rank sent to and received from each rank, and the bytes of a row."""

    phase: str
    seconds: float
    wait_seconds: float
    input_splits: list[int]
    output_splits: list[int]
    row_bytes: int


class TimedAllToAll:
    """A drop-in for a dispatcher's `all_to_all` that calls `note(Exchange)` after each exchange. With
    `barrier`, the ranks first meet at a barrier, timed apart, so that the exchange's time is the wire's and not
    the wait for a slower rank."""

    def __init__(self, note: Callable[[Exchange], None], barrier: bool = False):
        self.note, self.barrier = note, barrier

    def __call__(self, x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        return _TimedExchange.apply(x_ND, output_splits, input_splits, group, self)

    def exchange(self, x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group,
                 phase: str) -> torch.Tensor:
        start = time.perf_counter()
        if self.barrier:
            dist.barrier(group=group)
        middle = time.perf_counter()
        out = exchange_rows(x_ND, output_splits, input_splits, group)
        row_bytes = math.prod(x_ND.shape[1:]) * x_ND.element_size()
        self.note(Exchange(phase, time.perf_counter() - middle, middle - start, list(input_splits),
                           list(output_splits), row_bytes))
        return out


class _TimedExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, group, timer: TimedAllToAll):
        ctx.splits, ctx.group, ctx.timer = (output_splits, input_splits), group, timer
        return timer.exchange(x_ND, output_splits, input_splits, group, "fwd")

    @staticmethod
    def backward(ctx, grad_ND):
        output_splits, input_splits = ctx.splits
        return ctx.timer.exchange(grad_ND, input_splits, output_splits, ctx.group, "bwd"), None, None, None, None
