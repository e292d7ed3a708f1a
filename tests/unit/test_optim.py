"""The learning-rate schedule against its closed form, and AdamW's weight-decay groups."""

import math

import pytest
import torch

from megatron.training.optim import build_optimizer, lr_at, set_lr

PEAK, MIN, WARMUP, DECAY = 6e-4, 6e-5, 100, 1000


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_warmup_is_linear_and_reaches_the_peak(style):
    assert lr_at(1, PEAK, MIN, WARMUP, DECAY, style) == pytest.approx(PEAK / WARMUP)
    assert lr_at(50, PEAK, MIN, WARMUP, DECAY, style) == pytest.approx(PEAK / 2)
    assert lr_at(WARMUP, PEAK, MIN, WARMUP, DECAY, style) == pytest.approx(PEAK)


@pytest.mark.parametrize("style", ["cosine", "linear"])
def test_decay_ends_at_min_lr_and_stays_there(style):
    assert lr_at(DECAY, PEAK, MIN, WARMUP, DECAY, style) == pytest.approx(MIN)
    assert lr_at(DECAY + 500, PEAK, MIN, WARMUP, DECAY, style) == pytest.approx(MIN)


def test_cosine_midpoint_and_linear_midpoint():
    mid = WARMUP + (DECAY - WARMUP) // 2
    assert lr_at(mid, PEAK, MIN, WARMUP, DECAY, "cosine") == pytest.approx((PEAK + MIN) / 2)
    assert lr_at(mid, PEAK, MIN, WARMUP, DECAY, "linear") == pytest.approx((PEAK + MIN) / 2)
    quarter = WARMUP + (DECAY - WARMUP) // 4
    expected = MIN + (PEAK - MIN) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(quarter, PEAK, MIN, WARMUP, DECAY, "cosine") == pytest.approx(expected)


def test_constant_keeps_the_peak():
    assert lr_at(DECAY + 1, PEAK, MIN, WARMUP, DECAY, "constant") == pytest.approx(PEAK)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1, torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_lr_scaled_parameters_follow_the_schedule_at_their_multiple_without_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1, torch.device("cpu"), {"1.weight": 10.0})
    decay, no_decay, scaled = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert scaled["params"][0] is model[1].weight and scaled["weight_decay"] == 0.0
    set_lr(optimizer, 2e-4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-4, 2e-4, 2e-3])
    with pytest.raises(ValueError, match="2.weight is not a parameter"):
        build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1, torch.device("cpu"), {"2.weight": 2.0})
