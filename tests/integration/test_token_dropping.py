"""Token dropping end to end: GPT-NeoX's capacity keys in a training run, and the dropped fraction per MoE layer
in metrics.jsonl (the layer's aux statistics, through the task's interval metrics)."""

from helpers.runs import read_metrics, write_config

import train


def test_a_run_with_token_dropping_logs_the_dropped_fraction_per_layer(tmp_path, data_prefix):
    moe = {"moe_num_experts": 4, "moe_top_k": 2, "moe_token_dropping": True, "moe_train_capacity_factor": 0.5,
           "moe_eval_capacity_factor": 2.0, "moe_min_capacity": 0, "moe_expert_interval": 1}
    config = write_config(tmp_path, data_prefix, train_iters=3, log_interval=1, eval_interval=3, **moe)
    train.run([str(config)])
    records = read_metrics(tmp_path / "logs")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and any("val/loss" in r for r in records)
    for layer in (0, 1):
        # 4 x 32 tokens, 2 slots each (256), 4 experts at factor 0.5: 32 slots each, so at least half are dropped
        assert all(r[f"moe/layer{layer}/dropped_fraction"] >= 0.5 for r in steps)
