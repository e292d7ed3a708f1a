"""End to end through train.py: exact resume, DDP equivalence, metrics format, falling loss."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.runs import read_metrics, train_losses, write_config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

MOE = {"moe_num_experts": 4, "moe_top_k": 2, "moe_zloss_coeff": 0.001}
# the rotation changes at steps 3 and 6, on both sides of the resume at step 4
LSH_REFRESHED = {**MOE, "lsh_compression": True, "lsh_hash_dim": 4, "lsh_rotation_refresh_interval": 3}
# draws random numbers every step: the resumed run must continue the saved generator state, not a fresh one
RANDOM = {**MOE, "hidden_dropout": 0.1, "attention_dropout": 0.1, "moe_jitter_eps": 0.1}


@pytest.mark.parametrize("extra", [{}, MOE, LSH_REFRESHED, RANDOM], ids=["dense", "moe", "lsh-refreshed", "dropout"])
def test_resume_continues_exactly(tmp_path, data_prefix, extra):
    straight = train.run([str(write_config(tmp_path / "a", data_prefix, **extra))])
    config = write_config(tmp_path / "b", data_prefix, **extra)
    first_half = train.run([str(config), "--exit_interval", "4"])
    second_half = train.run([str(config)])
    assert len(first_half.losses) == 4 and len(second_half.losses) == 4
    assert first_half.losses + second_half.losses == pytest.approx(straight.losses, abs=1e-6)
    assert second_half.last_eval["val/loss"] == pytest.approx(straight.last_eval["val/loss"], abs=1e-6)


def test_metrics_jsonl_records_and_falling_loss(tmp_path, data_prefix):
    config = write_config(tmp_path, data_prefix, train_iters=40, eval_interval=20, checkpoint_factor=20)
    train.run([str(config)])
    records = read_metrics(tmp_path / "logs")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 41))
    assert {"lr", "tokens", "tokens_per_sec"} <= set(train_records[0])
    assert train_records[-1]["tokens"] == 40 * 4 * 32
    evals = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["val/ppl"] == pytest.approx(np.exp(evals[-1]["val/loss"]), rel=1e-6)
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] < np.log(256)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["global_step20", "global_step40", "latest"]


def test_ddp_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, data_prefix):
    one = write_config(tmp_path / "one", data_prefix, gradient_accumulation_steps=2, train_iters=4,
                       checkpoint_factor=100, **MOE)
    two = write_config(tmp_path / "two", data_prefix, gradient_accumulation_steps=1, train_iters=4,
                       checkpoint_factor=100, **MOE)
    train.run([str(one)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(REPO / "train.py"), str(two)]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True, timeout=240)
    single = read_metrics(tmp_path / "one" / "logs")
    ddp = read_metrics(tmp_path / "two" / "logs")
    assert train_losses(ddp) == pytest.approx(train_losses(single), abs=1e-5)
    assert len(train_losses(ddp)) == 4
    # the global norm counts each replicated element once (AdamW hides a wrongly scaled, clipped gradient)
    norms = [[r["grad_norm"] for r in records if "loss" in r] for records in (ddp, single)]
    assert len(norms[0]) == 4 and norms[0] == pytest.approx(norms[1], rel=1e-4)


def test_config_errors_exit_with_one_line(tmp_path, data_prefix):
    config = write_config(tmp_path, data_prefix, hiden_size=32)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), str(config)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "hiden_size" in result.stderr and "hidden_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_moe_runs_log_aux_losses_and_routing_statistics(tmp_path, data_prefix):
    lore = {**MOE, "lore_num_experts": 4, "lore_rank": 4, "moe_expert_interval": 2}
    config = write_config(tmp_path, data_prefix, train_iters=4, log_interval=2, checkpoint_factor=100, **lore)
    train.run([str(config)])
    records = [r for r in read_metrics(tmp_path / "logs") if "loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    last = records[-1]
    assert last["total_loss"] > last["loss"] and last["moe/load_balancing_loss"] >= 1.0 - 1e-6
    assert 0 < last["moe/layer0/lore_load_entropy"] <= 1 and 0 < last["moe/layer0/expert_load_entropy"] <= 1
    assert sum(last["moe/layer0/expert_load"]) == pytest.approx(1.0, abs=1e-3)
    lore_load = last["moe/layer0/lore_load"]
    assert len(lore_load) == 4 and all(len(row) == 4 for row in lore_load)
    assert all(sum(row) == pytest.approx(1.0, abs=1e-3) or sum(row) == 0 for row in lore_load)
    assert "moe/layer1/expert_load" not in last  # one MoE layer of two, at interval 2


def main_job_args(tmp_path: Path, *extra: str) -> list[str]:
    run = tmp_path / "run"
    return [str(REPO / "configs" / "tiny.yml"), "--data_path", str(tmp_path / "data" / "shakespeare_text_document"),
            "--vocab_file", str(REPO / "megatron/data/bundled/shakespeare_tokenizer.json"), "--save", str(run),
            "--load", str(run), "--log_dir", str(run / "logs"), "--tensorboard_dir", str(run / "tb"), *extra]


def test_main_job_prepares_the_bundled_corpus_and_learns(tmp_path):
    result = train.run(main_job_args(tmp_path, "--train_iters", "60", "--eval_interval", "30", "--eval_iters", "4"))
    assert (tmp_path / "data" / "shakespeare_text_document.idx").is_file()
    evals = [r["val/loss"] for r in read_metrics(tmp_path / "run" / "logs") if "val/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] < np.log(8192) + 0.5
    assert result.final_step == 60 and (tmp_path / "run" / "latest").read_text() == "global_step60"


@pytest.mark.slow
def test_full_main_job_reaches_a_low_validation_loss(tmp_path):
    """The README's main job as shipped (600 steps, ~2 minutes)."""
    train.run(main_job_args(tmp_path))
    evals = [r["val/loss"] for r in read_metrics(tmp_path / "run" / "logs") if "val/loss" in r]
    assert evals == sorted(evals, reverse=True) and evals[-1] < 5.2
