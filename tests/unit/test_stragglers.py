"""The straggler watch's rule on given per-rank times (megatron/parallel/stragglers.py), without processes: a rank is
named once when it stays `factor` x the other ranks' median for `window` intervals, and once when that ends."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from megatron.config import ConfigError, load_config
from megatron.parallel.stragglers import StragglerWatch, WorkClock


def watch(factor: float = 2.0, window: int = 3, world: int = 4) -> StragglerWatch:
    return StragglerWatch(factor, window, rank=0, world_size=world, device=torch.device("cpu"))


def straggler_lines(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "megatron.stragglers"]
    caplog.clear()
    return lines


def test_a_rank_slow_for_a_whole_window_is_named_once_and_its_end_once(caplog):
    caplog.set_level(logging.WARNING)
    w = watch(window=3)
    w.hosts = ["n0", "n1", "n2", "n3"]
    normal, slow = [1.0, 1.1, 0.9, 1.0], [1.0, 1.1, 0.9, 2.5]
    for _ in range(2):
        w.observe(slow)
    assert straggler_lines(caplog) == []  # two slow intervals of a window of three: not yet
    ratios = w.observe(slow)
    assert ratios[3] == pytest.approx(2.5 / 1.0)  # against the median of the *other* ranks
    [line] = straggler_lines(caplog)
    assert line.startswith("straggler: rank 3 (host n3) took 2.5s per step on its own work, 2.5 x the other ranks' "
                           "median, in each of the last 3 log intervals")
    for _ in range(5):
        w.observe(slow)
    assert straggler_lines(caplog) == []  # once, not every interval
    w.observe(normal)
    w.observe(normal)
    assert straggler_lines(caplog) == []  # still slow in one of the last three
    w.observe(normal)
    [line] = straggler_lines(caplog)
    assert line.startswith("straggler: rank 3 (host n3) is no longer slow")


def test_two_ranks_compare_each_with_the_other():
    """With two ranks the median of all would be their mean, which a rank can never reach twice of."""
    w = watch(window=1, world=2)
    w.observe([0.1, 0.25])
    assert w.flagged == {1}


def test_a_rank_slow_now_and_then_is_not_named():
    w = watch(window=3)
    for times in ([1, 1, 1, 3], [1, 1, 1, 1], [1, 1, 1, 3], [1, 1, 1, 3], [1, 1, 1, 1]):
        w.observe([float(t) for t in times])
    assert w.flagged == set()


def test_only_rank_0_speaks(caplog):
    caplog.set_level(logging.WARNING)
    w = StragglerWatch(2.0, 1, rank=1, world_size=2, device=torch.device("cpu"))
    w.observe([0.1, 1.0])
    assert w.flagged == {1} and straggler_lines(caplog) == []


def test_a_few_milliseconds_more_is_noise_not_a_straggler():
    w = watch(window=1, world=2)
    w.observe([0.004, 0.012])  # 3 x, but 8 ms: a busy host's scheduling
    assert w.flagged == set()
    w.observe([0.004, 0.030])
    assert w.flagged == {1}


def test_the_work_clock_leaves_out_the_wait_in_ddps_buffer_broadcast():
    """Pre-hooks on the wrapper (before DDP broadcasts buffers) and on the model (after) pause the clock."""
    inner = torch.nn.Linear(2, 2)
    wrapper = torch.nn.Sequential(inner)  # stands in for DDP: its forward calls the inner module
    clock = WorkClock(torch.device("cpu"))
    clock.exclude_wrapper_waits(wrapper, inner)
    wrapper.register_forward_pre_hook(lambda *_: time.sleep(0.2))  # the "broadcast", after the pause hook
    clock.start()
    wrapper(torch.ones(1, 2))
    clock.stop()
    assert clock.take() < 0.1
    inner(torch.ones(1, 2))  # outside a step (evaluation calls the model): nothing counted
    assert clock.take() == 0.0


def test_the_work_clock_sums_the_timed_stretches_only():
    clock = WorkClock(torch.device("cpu"))
    for _ in range(3):
        clock.start()
        torch.ones(1)
        clock.stop()
    clock.stop()  # a stop without a start adds nothing
    first = clock.take()
    assert 0 < first < 1 and clock.take() == 0.0


def test_the_keys_factor_0_turns_it_off_and_a_window_without_it_cannot_act():
    assert load_config([], ["--straggler_factor", "0"]).straggler_factor == 0
    with pytest.raises(ConfigError, match=r"straggler_factor: expected 0 \(off\) or a factor above 1, got 1\.0"):
        load_config([], ["--straggler_factor", "1"])
    with pytest.raises(ConfigError, match=r"straggler_window: 5 cannot act .*needs straggler_factor > 0"):
        load_config([], ["--straggler_factor", "0", "--straggler_window", "5"])
