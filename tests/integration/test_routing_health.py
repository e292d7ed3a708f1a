"""Routing health: dead experts/LoREs after `patience` intervals below the share, collapsed layers, recovery."""

import io
import logging

import pytest
import torch
from helpers.runs import read_metrics, write_config

import train
from megatron.training.routing_health import RoutingHealth


def stats(expert_load, entropy=0.9, lore_load=None, layer=0):
    out = {f"moe/layer{layer}/expert_load": expert_load, f"moe/layer{layer}/expert_load_entropy": entropy}
    if lore_load is not None:
        out[f"moe/layer{layer}/lore_load"] = lore_load
    return out


def test_a_starving_expert_is_dead_after_patience_intervals_and_recovers(caplog):
    health = RoutingHealth(min_share=0.1, patience=3, min_entropy=0.5)
    starving = stats([0.49, 0.49, 0.015, 0.005])  # fair share 0.25: 0.1 x fair = 0.025; experts 2 and 3 are below
    with caplog.at_level(logging.INFO, logger="megatron.routing"):
        counts = [health.update(step, starving)["moe/dead_experts"] for step in (10, 20, 30, 40)]
        assert counts == [0, 0, 2, 2]  # dead on the third interval in a row, still dead on the fourth
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2 and "expert 2 of MoE layer 0 is dead" in warnings[0]  # once each, not per interval
        assert health.update(50, stats([0.25, 0.25, 0.25, 0.25]))["moe/dead_experts"] == 0
        assert "expert 2 of MoE layer 0 recovered" in caplog.records[-2].getMessage()


def test_a_dip_shorter_than_patience_is_quiet(caplog):
    health = RoutingHealth(min_share=0.1, patience=3)
    with caplog.at_level(logging.INFO, logger="megatron.routing"):
        for step, load in enumerate([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25] * 4, [0.5, 0.5, 0, 0]]):
            assert health.update(step, stats(load))["moe/dead_experts"] == 0
    assert not caplog.records


def test_lores_within_an_expert_and_collapsed_layers(caplog):
    health = RoutingHealth(min_share=0.2, patience=1, min_entropy=0.5)
    lore = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]  # expert 1 got no rows: no verdict
    with caplog.at_level(logging.WARNING, logger="megatron.routing"):
        metrics = health.update(5, stats([0.4, 0.3, 0.3], entropy=0.3, lore_load=lore))
    assert metrics == {"moe/dead_experts": 0.0, "moe/dead_lores": 2.0, "moe/collapsed_layers": 1.0}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "LoRE 2 of expert 0 in MoE layer 0 is dead" in messages and "layer 0's routing collapsed" in messages
    assert health.update(6, stats([0.4, 0.3, 0.3], entropy=0.9))["moe/collapsed_layers"] == 0


def test_the_streaks_and_verdicts_survive_a_checkpoint():
    """Saved mid-streak (weights_only, as a checkpoint's rank file is read), loaded into a fresh tracker: the next
    interval gives the verdicts the uninterrupted tracker gives."""
    low = stats([0.49, 0.49, 0.015, 0.005], entropy=0.3, lore_load=[[0.7, 0.3, 0.0], [0.0, 0.0, 0.0], [1, 0, 0]])
    straight, first = RoutingHealth(min_share=0.1, patience=3), RoutingHealth(min_share=0.1, patience=3)
    for step in (1, 2):  # 2 intervals low of the 3 that make a unit dead
        straight.update(step, low)
        first.update(step, low)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = RoutingHealth(min_share=0.1, patience=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.update(3, low) == straight.update(3, low) == {
        "moe/dead_experts": 2.0, "moe/dead_lores": 3.0, "moe/collapsed_layers": 1.0}
    assert resumed.state_dict() == straight.state_dict()
    assert RoutingHealth(min_share=0.1, patience=3).update(3, low)["moe/dead_experts"] == 0  # without: no streaks


def test_a_crowded_expert_parallel_rank_is_warned_about_once_per_layer_and_interval(caplog):
    health = RoutingHealth(receive_factor=4.0)
    crowded = {**stats([0.25] * 4), "moe/layer0/max_rank_rows_over_mean": 5.5, **stats([0.25] * 4, layer=1),
               "moe/layer1/max_rank_rows_over_mean": 3.9}
    with caplog.at_level(logging.WARNING, logger="megatron.routing"):
        for step in (10, 20):
            health.update(step, crowded)
        RoutingHealth(receive_factor=0.0).update(30, crowded)  # 0: never
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("MoE layer 0: an expert-parallel rank received 5.5 x" in m for m in messages)
    assert messages[0].startswith("step 10") and messages[1].startswith("step 20")  # each interval it lasts


@pytest.mark.parametrize("min_share, expected", [(0.0, 0.0), (1.0, None)])
def test_an_moe_run_logs_health_metrics(tmp_path, data_prefix, min_share, expected):
    moe = {"moe_num_experts": 4, "moe_top_k": 1, "moe_router_type": "topk", "pos_emb": "rotary"}
    config = write_config(tmp_path, data_prefix, train_iters=4, log_interval=1, eval_interval=0,
                          checkpoint_factor=100, moe_health_min_share=min_share, moe_health_patience=1, **moe)
    train.run([str(config)])
    records = [r for r in read_metrics(tmp_path / "logs") if "loss" in r]
    assert all("moe/dead_experts" in r for r in records)
    if expected is not None:  # the check is off: never a dead expert
        assert all(r["moe/dead_experts"] == expected for r in records)
    else:  # every expert below its fair share counts: the unbalanced ones (a top-1 router is never exactly even)
        below = [share < 0.25 for layer in (0, 1) for share in records[-1][f"moe/layer{layer}/expert_load"]]
        assert records[-1]["moe/dead_experts"] == sum(below) > 0  # over both MoE layers of the model
