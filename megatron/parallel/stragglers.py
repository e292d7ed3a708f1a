"""A slow rank, named: warn once when a rank's own work per step stays `factor` x the other ranks' median.

Why not the step time: every step ends in collectives, so every rank's step takes as long as the slowest
rank's, and the fast ones spend the difference waiting. What differs per rank is its work before it waits on
the others. `WorkClock` times, per step, the stretch from the step's start to the last micro-batch's backward,
where DDP's gradient all-reduce begins: fetching the micro-batches, their forward passes and the backward
passes of all but the last, less DDP's broadcast of the buffers from rank 0 before each forward (forward
pre-hooks on the wrapper and on the model). In a DDP run without expert parallelism nothing else there waits
on another rank. With expert parallelism or FSDP (zero_stage > 0) the forward passes hold collectives, so the
fast ranks' time includes waiting too and a straggler shows less, or not at all: the watch may miss a slow
rank there, but never names a rank that is not slow. A rank must also lag the others' median by
`NOISE_FLOOR_SECONDS` per step.

On GPUs the stretch is timed with CUDA events (the forward is launched asynchronously, so the host's clock
would time the launches only); the events are read at the log interval, after the step's metrics have synced.

Once per log interval the ranks all-gather their mean per-step time (one small collective): a rank at or
above `factor` x the median of the other ranks in each of the last `window` intervals is warned about once,
naming its rank and host; when it has been below that for `window` intervals, once more.
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from collections import deque

import torch
import torch.distributed as dist

from megatron.parallel.expert_parallel import all_gather_flat

log = logging.getLogger("megatron.stragglers")
# A rank is slow only when it also lags the others by this much per step: below it, scheduling noise on a busy host
# can double a few milliseconds of work, and no run is held up by it.
NOISE_FLOOR_SECONDS = 0.02


class WorkClock:
    """Seconds of a rank's own work, summed over the steps since the last `take`: from `start` to `stop` within
    a step, less the stretches from `pause` to `resume` (waits inside, such as DDP's buffer broadcast)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.in_step = False
        self.seconds = 0.0
        self.begun: float | torch.cuda.Event | None = None  # the open stretch
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: read at `take`

    def start(self) -> None:
        self.in_step = True
        self._begin()

    def stop(self) -> None:
        self._end()
        self.in_step = False

    def pause(self, *_) -> None:
        """As a forward pre-hook of the DDP wrapper: before it broadcasts buffers from rank 0."""
        if self.in_step:
            self._end()

    def resume(self, *_) -> None:
        """As a forward pre-hook of the module DDP wraps: after the broadcast."""
        if self.in_step:
            self._begin()

    def exclude_wrapper_waits(self, wrapper: torch.nn.Module, inner: torch.nn.Module) -> None:
        """DDP broadcasts the model's buffers (rotary tables, routing biases) from rank 0 before every forward, so
        rank 0 waits there for the slowest rank: that wait is not its own work."""
        if wrapper is not inner:
            wrapper.register_forward_pre_hook(self.pause)
            inner.register_forward_pre_hook(self.resume)

    def _begin(self) -> None:
        if self.cuda:
            self.begun = torch.cuda.Event(enable_timing=True)
            self.begun.record()
        else:
            self.begun = time.perf_counter()

    def _end(self) -> None:
        if self.begun is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self.begun, end))
        else:
            self.seconds += time.perf_counter() - self.begun
        self.begun = None

    def take(self) -> float:
        """The sum since the last call, and start a new one."""
        for begin, end in self.pending:
            end.synchronize()
            self.seconds += begin.elapsed_time(end) / 1000
        self.pending.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class StragglerWatch:
    """Names ranks whose work per step stays `factor` x the others' median for `window` log intervals."""

    def __init__(self, factor: float, window: int, rank: int, world_size: int, device: torch.device):
        self.factor, self.window, self.rank, self.device = factor, window, rank, device
        self.clock = WorkClock(device)
        self.slow_history: deque[set[int]] = deque(maxlen=window)  # per interval: the ranks at or above factor
        self.flagged: set[int] = set()
        self.hosts = [socket.gethostname()] * world_size
        if dist.is_initialized() and world_size > 1:  # once: names for the warnings
            dist.all_gather_object(self.hosts, socket.gethostname())

    def update(self, steps: int) -> dict[str, float]:
        """At a log interval, on every rank (a collective): gathers each rank's mean work per step over the
        interval's `steps` and warns. Returns the slowest rank's ratio to the others' median, for the metrics."""
        mine = torch.tensor([self.clock.take() / max(steps, 1)], dtype=torch.float64, device=self.device)
        gathered = torch.zeros(len(self.hosts), dtype=torch.float64, device=self.device)
        all_gather_flat(gathered, mine, group=None)
        ratios = self.observe(gathered.tolist())
        slowest = max(range(len(ratios)), key=ratios.__getitem__)
        return {"stragglers/max_work_ratio": ratios[slowest], "stragglers/slowest_rank": float(slowest)}

    def observe(self, seconds: list[float]) -> list[float]:
        """One interval's per-rank seconds per step: updates the window, logs starts and ends, returns each rank's
        ratio to the median of the others."""
        others = [statistics.median(seconds[:r] + seconds[r + 1:]) for r in range(len(seconds))]
        ratios = [rank_seconds / max(median, 1e-9) for rank_seconds, median in zip(seconds, others)]
        self.slow_history.append({r for r, (ratio, median) in enumerate(zip(ratios, others))
                                  if ratio >= self.factor and seconds[r] - median >= NOISE_FLOOR_SECONDS})
        if len(self.slow_history) < self.window:
            return ratios
        always_slow = set.intersection(*self.slow_history)
        never_slow = set(range(len(seconds))) - set.union(*self.slow_history)
        for r in sorted(always_slow - self.flagged) if self.rank == 0 else ():  # every rank keeps the state
            log.warning("straggler: rank %d (host %s) took %.3gs per step on its own work, %.1f x the other ranks' "
                        "median, in each of the last %d log intervals (straggler_factor %g)", r, self.hosts[r],
                        seconds[r], ratios[r], self.window, self.factor)
        for r in sorted(self.flagged & never_slow) if self.rank == 0 else ():
            log.warning("straggler: rank %d (host %s) is no longer slow: %.3gs per step against the other ranks' "
                        "median of %.3gs, below %g x in each of the last %d log intervals", r, self.hosts[r],
                        seconds[r], others[r], self.factor, self.window)
        self.flagged = (self.flagged | always_slow) - never_slow
        return ratios
