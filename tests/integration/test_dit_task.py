"""The DiT family through the one trainer: exact resume, hierarchical sampling, prior annealing, expert draws."""

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.runs import plain_dit_without_remix_keys, read_metrics, train_losses

from megatron.config import ConfigError, load_config
from megatron.model.dit import expert_of_timestep, timestep_interval
from megatron.parallel import DistInfo
from megatron.training.dit_task import DiTTask, prior_weight_at

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import train  # noqa: E402


def dit_config(folder: Path, **overrides) -> Path:
    config = {
        "model_type": "dit", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
        "image_size": 8, "image_channels": 1, "patch_size": 2, "num_classes": 10,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "warmup": 0.1,
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_iters": 8,
        "log_interval": 1, "eval_interval": 4, "checkpoint_factor": 4, "seed": 3,
        "remix_num_basis": 3, "remix_num_experts": 5, "remix_prior_anneal_iters": 6,
        "save": str(folder / "ckpt"), "load": str(folder / "ckpt"), "log_dir": str(folder / "logs"),
    }
    config = plain_dit_without_remix_keys({**config, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    return folder / "config.yml"


def task_for(tmp_path: Path, rank: int = 0, world: int = 1, **overrides) -> DiTTask:
    args = load_config([str(dit_config(tmp_path, **overrides))], data_parallel_size=world)
    return DiTTask(args, DistInfo(rank, world, rank, torch.device("cpu")))


@pytest.mark.parametrize("extra", [{}, {"remix_num_basis": 0}, {"remix_expert_draw": "micro_batch",
                                                                 "gradient_accumulation_steps": 2}],
                         ids=["remix", "plain", "remix-per-micro-batch"])
def test_a_dit_run_resumes_exactly(tmp_path, extra):
    straight = train.run([str(dit_config(tmp_path / "a", **extra))])
    config = dit_config(tmp_path / "b", **extra)
    first = train.run([str(config), "--exit_interval", "4"])
    second = train.run([str(config)])
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-6)
    assert second.last_eval["val/loss"] == pytest.approx(straight.last_eval["val/loss"], abs=1e-6)
    records = read_metrics(tmp_path / "a" / "logs")
    assert len(train_losses(records)) == 8
    if not extra.get("remix_num_basis", 3) == 0:
        weights = [r["remix/prior_weight"] for r in records if "remix/prior_weight" in r]
        assert weights == pytest.approx([1.0 * (1 - s / 6) for s in range(6)] + [0.0, 0.0])


def test_prior_weight_anneals_linearly_to_exactly_zero_and_stays():
    assert prior_weight_at(0, 0.5, 100) == 0.5
    assert prior_weight_at(50, 0.5, 100) == pytest.approx(0.25)
    assert [prior_weight_at(s, 0.5, 100) for s in (100, 101, 10_000)] == [0.0, 0.0, 0.0]
    assert prior_weight_at(0, 0.5, 0) == 0.0


def test_hierarchical_sampling_draws_timesteps_inside_the_chosen_experts_interval(tmp_path):
    task = task_for(tmp_path, remix_num_experts=7, diffusion_steps=1000, train_micro_batch_size_per_gpu=64)
    seen = set()
    for step in range(30):
        batch = task.train_batch(step, 0)
        expert = task.draw_expert(step, 0)
        lo, hi = timestep_interval(expert, task.remix)
        assert lo <= int(batch.timesteps_B.min()) and int(batch.timesteps_B.max()) < hi
        assert set(expert_of_timestep(batch.timesteps_B, task.remix).tolist()) == {expert}
        seen.add(expert)
    assert len(seen) >= 5  # the draw moves over the experts


@pytest.mark.parametrize("draw, same_over_ranks, same_over_micro", [
    ("step", True, True), ("rank", False, True), ("micro_batch", False, False)])
def test_who_draws_the_expert(tmp_path, draw, same_over_ranks, same_over_micro):
    tasks = [task_for(tmp_path / str(r), rank=r, world=2, remix_num_experts=50, remix_expert_draw=draw,
                      gradient_accumulation_steps=2, diffusion_steps=1000) for r in range(2)]
    steps = range(12)
    over_ranks = all(tasks[0].draw_expert(s, 0) == tasks[1].draw_expert(s, 0) for s in steps)
    over_micro = all(tasks[0].draw_expert(s, 0) == tasks[0].draw_expert(s, 1) for s in steps)
    assert (over_ranks, over_micro) == (same_over_ranks, same_over_micro)


def test_one_rank_with_accumulation_sees_the_images_of_two_ranks(tmp_path):
    one = task_for(tmp_path / "one", gradient_accumulation_steps=2, remix_expert_draw="micro_batch")
    two = [task_for(tmp_path / f"two{r}", rank=r, world=2, remix_expert_draw="micro_batch") for r in range(2)]
    for step in (0, 3):
        for micro in range(2):
            a, b = one.train_batch(step, micro), two[micro].train_batch(step, 0)
            for name in ("images_BCHW", "labels_B", "timesteps_B", "noise_BCHW"):
                assert torch.equal(getattr(a, name), getattr(b, name))


def test_coefficient_learning_rate_is_its_own(tmp_path):
    task = task_for(tmp_path, remix_coeff_lr=0.05)
    scales = task.lr_scales()
    assert scales and list(scales.values()) == pytest.approx([50.0] * len(scales))
    assert set(scales) == set(task.model.coefficient_parameter_names())


def test_coefficient_metrics_are_the_tables_entropy_and_top_share(tmp_path):
    task = task_for(tmp_path)
    rows = [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.6, 0.3, 0.1]]
    with torch.no_grad():  # softmax of log p is p (a zero stays a zero as -inf)
        task.model.remix_coeffs.logits.copy_(torch.tensor(rows).log())
    entropies = [-sum(p * math.log(p) for p in row if p > 0) / math.log(3) for row in rows]
    metrics = task.interval_metrics()
    assert metrics["remix/coeff_entropy"] == pytest.approx(sum(entropies) / 5, abs=1e-6)
    assert metrics["remix/coeff_max"] == pytest.approx((1 / 3 + 0.5 + 1.0 + 0.5 + 0.6) / 5, abs=1e-6)


def test_bad_dit_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="image_size 10 is not divisible by patch_size 4"):
        load_config([str(dit_config(tmp_path, image_size=10, patch_size=4))])
    with pytest.raises(ConfigError, match="image_channels 3"):
        task_for(tmp_path, image_channels=3)


def test_evaluation_samples_a_grid_and_a_frechet_distance(tmp_path):
    result = train.run([str(dit_config(tmp_path, train_iters=4, fd_samples=20, sample_steps=2))])
    assert (tmp_path / "logs" / "samples" / "step4.png").is_file()
    assert result.last_eval["val/fd"] > 0 and result.last_eval["val/fd_stderr"] > 0
    assert set(result.last_eval) >= {f"val/loss_t{i}" for i in range(10)}
    per_interval = [result.last_eval[f"val/loss_t{i}"] for i in range(10)]
    assert result.last_eval["val/loss"] == pytest.approx(sum(per_interval) / 10)
