"""Long CPU runs: resident memory stays flat after warm-up (slow: thousands of steps; CI runs the short check)."""

import pytest
from helpers.runs import read_metrics, write_config

import train


def rss_by_step(tmp_path, data_prefix, steps: int, log_interval: int, **overrides) -> dict[int, float]:
    config = write_config(tmp_path, data_prefix, train_iters=steps, log_interval=log_interval, eval_interval=0,
                          checkpoint_factor=10**6, save=None, load=None, pos_emb="rotary", **overrides)
    train.run([str(config)])
    return {r["step"]: r["memory/rss_mb"] for r in read_metrics(tmp_path / "logs") if "memory/rss_mb" in r}


def test_rss_is_logged_every_interval(tmp_path, data_prefix):
    rss = rss_by_step(tmp_path, data_prefix, steps=6, log_interval=2)
    assert sorted(rss) == [2, 4, 6] and all(50 < v < 10_000 for v in rss.values())


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True])
def test_memory_is_flat_over_thousands_of_steps(tmp_path, data_prefix, moe):
    extra = {"moe_num_experts": 4, "moe_top_k": 2, "moe_router_type": "topk"} if moe else {}
    rss = rss_by_step(tmp_path, data_prefix, steps=3000, log_interval=100, **extra)
    after_warmup = [v for step, v in sorted(rss.items()) if step >= 500]
    growth = after_warmup[-1] - min(after_warmup)
    assert growth < 0.05 * min(after_warmup) + 8, f"RSS grew {growth:.1f} MiB after warm-up: {rss}"
