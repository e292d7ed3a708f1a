"""megatron/hf/gpt_oss.py's pieces against closed forms: the experts' column de-interleaving, the window pattern
read from layer_types, and which models gpt-oss holds by the field rule of megatron/hf/fields.py (every field
held or blocking: tests/unit/test_hf_fields.py)."""

import dataclasses

import pytest
import torch

from megatron.hf.gpt_oss import (
    deinterleave,
    gpt_oss_blockers,
    gpt_oss_config,
    interleave,
    shortest_cycle,
)
from megatron.model.gpt import GPTConfig
from megatron.model.moe import MoEArchitecture, MoERuntime
from megatron.model.moe.lore import LoREConfig
from megatron.model.rope import YarnRopeScaling

GPT_OSS_SHAPED = GPTConfig(
    vocab_size=64, num_layers=4, hidden_size=32, num_attention_heads=4, head_dim=16, num_kv_heads=2,
    sliding_window_width=5, sliding_window_pattern=("sliding", "full"), attention_sinks=True, norm="rmsnorm",
    activation="clamped_swiglu", use_bias_in_mlp=False, intermediate_size=48,
    rope_scaling=YarnRopeScaling(32.0, 4096, truncate=False),
    moe=MoEArchitecture(4, top_k=2, ffn_hidden_size=16, renormalize=True, router_bias=True, expert_biases=True))


def test_gate_up_columns_are_de_interleaved_and_back():
    """gpt-oss's columns [g0, u0, g1, u1, g2, u2] (gate at even, up at odd) are ours [u0, u1, u2 | g0, g1, g2]."""
    gate_up = torch.tensor([[10.0, 20.0, 11.0, 21.0, 12.0, 22.0]])
    assert deinterleave(gate_up).tolist() == [[20.0, 21.0, 22.0, 10.0, 11.0, 12.0]]
    weights_EDF = torch.randn(3, 5, 8)
    assert torch.equal(interleave(deinterleave(weights_EDF)), weights_EDF)
    assert torch.equal(deinterleave(interleave(weights_EDF)), weights_EDF)


@pytest.mark.parametrize("kinds, cycle", [
    (["sliding", "full"] * 3, ["sliding", "full"]),
    (["sliding", "sliding", "full"] * 2, ["sliding", "sliding", "full"]),
    (["full"] * 4, ["full"]),
    (["sliding", "full", "full"], ["sliding", "full", "full"]),  # no shorter cycle: the whole list
], ids=["gpt_oss", "period3", "constant", "aperiodic"])
def test_the_window_pattern_is_the_shortest_cycle(kinds, cycle):
    assert shortest_cycle(kinds) == cycle


def test_layer_types_follow_our_per_layer_windows():
    config = gpt_oss_config(GPT_OSS_SHAPED)
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert config["sliding_window"] == 6 and config["head_dim"] == 16 and config["intermediate_size"] == 16
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["truncate"] is False


def test_a_gpt_oss_shaped_model_is_held():
    assert gpt_oss_blockers(GPT_OSS_SHAPED, MoERuntime()) == []


@pytest.mark.parametrize("change, reason", [
    ({"attention_sinks": False}, "attention_sinks: False (expected True)"),
    ({"activation": "swiglu"}, "activation: 'swiglu' (expected 'clamped_swiglu')"),
    ({"qk_norm": True}, "qk_norm: True (expected False)"),
    ({"moe": None}, "moe: None (expected an MoE model: every gpt-oss layer is one)"),
    ({"moe": dataclasses.replace(GPT_OSS_SHAPED.moe, router_bias=False)}, "moe.router_bias: False (expected True)"),
    ({"moe": dataclasses.replace(GPT_OSS_SHAPED.moe, num_shared_experts=1)},
     "moe.num_shared_experts: 1 (expected 0)"),
    ({"moe": dataclasses.replace(GPT_OSS_SHAPED.moe, lore=LoREConfig(4, 2))},
     "moe.lore: LoREConfig(...) (expected None)"),
], ids=["no_sinks", "swiglu", "qk_norm", "dense", "no_router_bias", "shared_expert", "lores"])
def test_what_gpt_oss_does_not_compute_blocks_it_by_name(change, reason):
    assert reason in gpt_oss_blockers(dataclasses.replace(GPT_OSS_SHAPED, **change))


def test_a_field_added_later_blocks_gpt_oss():
    newer_gpt = dataclasses.make_dataclass("NewerGPTConfig", [("new_feature", bool, False)], bases=(GPTConfig,))
    newer = newer_gpt(**{f.name: getattr(GPT_OSS_SHAPED, f.name) for f in dataclasses.fields(GPT_OSS_SHAPED)})
    assert gpt_oss_blockers(newer) == []
    assert gpt_oss_blockers(dataclasses.replace(newer, new_feature=True)) == ["new_feature: True (expected False)"]

