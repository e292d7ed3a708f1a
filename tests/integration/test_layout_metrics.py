"""Every logged metric is a property of the global batch: the same run at 1 rank, DP = 2 and EP = 2, and resumed
at another layout (1 rank -> EP = 2, EP = 2 -> 1 rank, at step 3), writes the same metrics.jsonl record for record
and key for key, except the keys that measure the machine or the exchange (`LAYOUT_KEYS`).

The 2-rank runs share one spawned pair of gloo processes (each `train.run` joins and leaves its own process group),
so the test pays the start-up of one extra pair of processes, not of one per run."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers.distributed import free_port
from helpers.runs import read_metrics, write_config

from megatron.config import load_config
from megatron.parallel import DistInfo
from megatron.training.lm_task import LMTask

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

# Every routing remedy that keeps state between micro-batches and steps, and every statistic with history:
# - sigmoid top-2 routing with the expert bias and global-batch balancing, LoREs with biases (5 experts: 3 + 2 on
#   EP = 2, so a mean over one rank's experts is not the mean over all);
# - routing health that counts every expert and LoRE below its fair share, dead after 2 intervals in a row: streaks
#   cross the resume at step 3, and a window that is not restored shows as other dead counts after it;
# - a loss-spike factor below 1: once its window holds 5 losses every loss is flagged, so `loss_spike` at step 6
#   shows whether the window survived the resume;
# - gradient accumulation: counts are summed over micro-batches as well as ranks;
# - a given peak_tflops: MFU without measuring this CPU's matmuls at every run's first log.
RUN = {
    "moe_num_experts": 5, "moe_top_k": 2, "moe_router_score_function": "sigmoid",
    "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 0.005, "moe_lbl_scope": "global_batch",
    "lore_num_experts": 4, "lore_rank": 2, "lore_top_k": 1, "lore_loss_coeff": 0.01, "lore_router_enable_bias": True,
    "lore_router_bias_update_rate": 0.005, "lore_lbl_scope": "global_batch",
    "moe_health_min_share": 1.0, "moe_health_patience": 2, "moe_health_min_entropy": 0.99, "loss_spike_factor": 0.5,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "min_lr": 1e-4, "seed": 3, "peak_tflops": 1.0,
    "train_iters": 6, "log_interval": 1, "checkpoint_factor": 3, "eval_interval": 3, "eval_iters": 1,
    "gradient_accumulation_steps": 2,
}
ONE_RANK = {"train_micro_batch_size_per_gpu": 4}
TWO_RANKS = {"train_micro_batch_size_per_gpu": 2}  # the same global batch of 8, micro-batch by micro-batch

# Keys allowed to differ between layouts: they describe the machine or the layout, not the run.
LAYOUT_KEYS = re.compile(r"^(tokens_per_sec|tflops_per_rank|mfu|memory/.*"  # speed and memory of this machine
                         r"|stragglers/.*"  # which rank was slowest: timing, and only where there are several
                         # the expert-parallel exchange's own (bytes sent, the busiest rank): logged only where there
                         # is an exchange, and a property of how the batch is split, by definition
                         r"|moe/layer\d+/(exchange_bytes_sent|max_rank_rows_over_mean))$")
COUNTS = re.compile(r"^(step|tokens|nonfinite_steps|loss_spike|moe/(dead_experts|dead_lores|collapsed_layers))$")


def _two_rank_runs(rank: int, world: int, runs: list[tuple[list[str], int]]) -> None:
    """Each (argv, port) as `train.py ARGV` on this rank, one after another (each run joins and leaves its group)."""
    torch.set_num_threads(1)
    for argv, port in runs:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        train.run(argv)


def assert_same_records(got: list[dict], expected: list[dict], label: str) -> None:
    """Record for record, key for key: counts and load tables exactly, other numbers to 1e-6 relative."""
    assert [r["step"] for r in got] == [r["step"] for r in expected], label
    for mine, theirs in zip(got, expected):
        keys = {k for k in mine if not LAYOUT_KEYS.match(k)}
        assert keys == {k for k in theirs if not LAYOUT_KEYS.match(k)}, f"{label}, step {mine['step']}"
        for key in sorted(keys):
            where = f"{label}, step {mine['step']}: {key}: {mine[key]} != {theirs[key]}"
            if COUNTS.match(key) or isinstance(mine[key], list):  # the lists: shares of equal counts, rounded
                assert mine[key] == theirs[key], where
            else:
                assert math.isclose(mine[key], theirs[key], rel_tol=1e-6, abs_tol=1e-12), where


def test_every_logged_metric_is_the_same_at_every_layout_and_after_a_resume(tmp_path, data_prefix):
    def config(name: str, ranks: dict, **overrides) -> str:
        return str(write_config(tmp_path / name, data_prefix, **RUN, **ranks, **overrides))

    one = config("one", ONE_RANK)
    train.run([one])  # checkpoints at steps 3 and 6
    dp, ep = config("dp", TWO_RANKS), config("ep", TWO_RANKS, moe_expert_parallel_size=2)
    up = config("up", TWO_RANKS, moe_expert_parallel_size=2, load=str(tmp_path / "one" / "ckpt" / "global_step3"))
    runs = [([dp], free_port()), ([ep], free_port()), ([up], free_port())]
    mp.spawn(_two_rank_runs, args=(2, runs), nprocs=2, join=True)
    down = config("down", ONE_RANK, load=str(tmp_path / "ep" / "ckpt" / "global_step3"))
    train.run([down])

    expected = read_metrics(tmp_path / "one" / "logs")
    assert_same_records(read_metrics(tmp_path / "dp" / "logs"), expected, "DP = 2")
    assert_same_records(read_metrics(tmp_path / "ep" / "logs"), expected, "EP = 2")
    after_step_3 = [r for r in expected if r["step"] > 3]
    assert_same_records(read_metrics(tmp_path / "up" / "logs"), after_step_3, "1 rank -> EP = 2 at step 3")
    assert_same_records(read_metrics(tmp_path / "down" / "logs"), after_step_3, "EP = 2 -> 1 rank at step 3")

    # what the comparison guards is there to compare
    steps = [r for r in expected if "loss" in r]
    assert len(steps) == 6 and [r["step"] for r in expected if "val/loss" in r] == [3, 6]
    # at step 4, right after the resume, every dead unit's streak (2 intervals) began before the resume
    assert steps[3]["moe/dead_experts"] > 0 and steps[3]["moe/dead_lores"] > 0
    assert [r.get("loss_spike", 0) for r in steps] == [0] * 5 + [1]
    assert any(r["moe/layer0/lore_bias_changed_fraction"] > 0 for r in steps)
    assert "moe/layer0/exchange_bytes_sent" in read_metrics(tmp_path / "ep" / "logs")[0]  # EP really exchanged


def test_an_evaluation_covers_eval_iters_global_batches_however_they_are_split(tmp_path, data_prefix):
    """As in GPT-NeoX, an evaluation iteration is one global batch: 1 rank with 8 x 1 or 4 x 2 (micro-batch x
    accumulation) evaluates the same held-out samples, and so does every other split of the global batch."""
    losses = []
    for micro, accumulation in ((8, 1), (4, 2)):
        config = write_config(tmp_path / f"{micro}x{accumulation}", data_prefix, train_micro_batch_size_per_gpu=micro,
                              gradient_accumulation_steps=accumulation, eval_iters=2)
        torch.manual_seed(0)
        task = LMTask(load_config([str(config)]), DistInfo(0, 1, 0, torch.device("cpu")))
        assert task.eval_micro_batches * micro == 2 * 8
        with torch.no_grad():
            losses.append(task.evaluate(task.model.eval())["val/loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
