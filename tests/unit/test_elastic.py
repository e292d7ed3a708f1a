"""The pieces an elastic restart at another world size relies on, without processes (the restart itself, two
torchrun agents on this machine with one killed, is `test_launch.py::test_losing_a_node_...`, marked slow):
the accumulation follows the world with the global batch fixed, a world that cannot hold the run is one line,
a resume that would change the global batch says why, and the save lock of an earlier attempt is taken over."""

from __future__ import annotations

import json

import pytest
import yaml

from megatron.config import ConfigError, load_config
from megatron.training import preflight
from megatron.training.checkpoint import check_same_run_settings

BATCH = ["--train_batch_size", "8", "--train_micro_batch_size_per_gpu", "2"]
MOE_EP2 = ["--moe_num_experts", "4", "--moe_top_k", "2", "--moe_router_type", "topk", "--moe_expert_parallel_size", "2"]


@pytest.mark.parametrize("ranks, accumulation", [(4, 1), (2, 2), (1, 4)])
def test_the_accumulation_is_derived_from_the_world_and_the_global_batch_stays(ranks, accumulation):
    args = load_config([], BATCH, data_parallel_size=ranks)
    assert (args.train_batch_size, args.train_micro_batch_size_per_gpu) == (8, 2)
    assert args.gradient_accumulation_steps == accumulation


@pytest.mark.parametrize("overrides, ranks, message", [
    (BATCH, 3, r"^train_batch_size 8 is not divisible by micro batch 2 x data-parallel 3$"),
    ([*BATCH, "--gradient_accumulation_steps", "2"], 1,
     r"^train_batch_size 8 != .* x data-parallel size 1 \(the number of ranks\): leave gradient_accumulation_steps "
     r"out to derive it from the ranks$"),
    ([*BATCH, *MOE_EP2], 1, r"^moe_expert_parallel_size 2 must divide the number of ranks 1$"),
])
def test_a_world_the_run_cannot_shrink_to_is_one_line(overrides, ranks, message):
    load_config([], overrides, data_parallel_size=2)  # the world the run started with
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides, data_parallel_size=ranks)


def saved_run(tmp_path, **batch) -> None:
    (tmp_path / "config.yml").write_text(yaml.safe_dump({"seq_length": 32, **batch}))


def test_a_fixed_accumulation_resumed_at_another_world_says_to_derive_it(tmp_path):
    saved_run(tmp_path, train_batch_size=8, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    shrunk = {"seq_length": 32, "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": 2}  # --gradient_accumulation_steps 2 at 1 rank instead of 2
    with pytest.raises(ValueError, match=r"train_batch_size: checkpoint 8, config 4\): the number of ranks changed "
                                         r"\(2 -> 1, an elastic restart\?\) with gradient_accumulation_steps fixed: "
                                         r"set train_batch_size 8 and leave gradient_accumulation_steps out"):
        check_same_run_settings(tmp_path, shrunk)
    other_micro = {**shrunk, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 4}  # same world, smaller micro
    with pytest.raises(ValueError, match=r"resume with the checkpoint's values") as err:
        check_same_run_settings(tmp_path, other_micro)
    assert "number of ranks" not in str(err.value)
    check_same_run_settings(tmp_path, {**shrunk, "train_batch_size": 8, "gradient_accumulation_steps": 4})  # derived


def test_the_save_lock_of_an_earlier_attempt_of_the_same_elastic_job_is_taken_over(monkeypatch):
    """The node whose rank 0 held the lock may be the one lost: its host can be another, and it is gone."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    holder = {"host": "lost-node", "pid": 4242, "elastic_run": "job7", "attempt": 0}
    assert preflight.is_stale(holder)
    assert not preflight.is_stale({**holder, "attempt": 1})  # this attempt's: a live run
    assert not preflight.is_stale({**holder, "elastic_run": "job8"})  # another job's
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default: names no job
    assert not preflight.is_stale(holder)


def test_the_lock_records_the_elastic_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    lock = preflight.SaveLock.acquire(str(tmp_path))
    record = json.loads((tmp_path / preflight.LOCK_NAME).read_text())
    assert (record["elastic_run"], record["attempt"]) == ("job7", 2)
    lock.release()


def test_neox_elasticity_stays_refused_saying_what_it_is(tmp_path):
    config = tmp_path / "neox.yml"
    config.write_text("elasticity: {enabled: true, max_train_batch_size: 64}\n")
    with pytest.raises(ConfigError, match=r"elasticity: .* is not supported \(DeepSpeed's elasticity, a search for a "
                                          r"batch size .*launch/torchrun_elastic\.sh\)"):
        load_config([str(config)])
