"""The closed-form parameter counts (megatron/sizing/params.py) against the model itself, built on the meta device,
for small random configs with each switch DeepSeek-V3 and gpt-oss brought: multi-head latent attention (with and
without the query latent, with biases), heads wider than hidden / heads, attention sinks, alternating windows,
router and expert biases, clamped SwiGLU, group-limited routing, dense first layers of their own width beside
narrower experts, shared experts and multi-token prediction modules. Total, active per token and the MTP line."""

from __future__ import annotations

import random

import pytest
import torch

from megatron.config import load_config
from megatron.data.tokenizer import vocab_size_of
from megatron.model.build import build_gpt
from megatron.model.moe import MoELayer
from megatron.sizing.params import count_parameters

MLA = ["--kv_lora_rank", "12", "--qk_nope_head_dim", "6", "--qk_rope_head_dim", "4", "--v_head_dim", "5"]
MOE = ["--moe_num_experts", "8", "--moe_top_k", "2", "--moe_router_type", "topk", "--moe_expert_interval", "1",
       "--moe_first_layer", "1", "--moe_ffn_hidden_size", "12"]
GROUPS = ["--moe_router_score_function", "sigmoid", "--moe_router_num_groups", "4", "--moe_router_group_top_k", "2",
          "--moe_router_scaling_factor", "2.5", "--moe_router_enable_expert_bias", "true"]
SWITCHES = {
    "mla_query_latent": [*MLA, "--q_lora_rank", "10", "--use_bias_in_attn_linear", "false"],
    "mla_direct_query_biases": [*MLA, "--use_bias_in_attn_linear", "true"],
    "mla_moe_shared_dense_first": [*MLA, "--q_lora_rank", "10", *MOE, "--moe_num_shared_experts", "2",
                                   "--activation", "swiglu", "--intermediate_size", "60", "--mlp_multiple_of", "1"],
    "wide_heads_gqa_biases": ["--head_dim", "16", "--num_kv_heads", "2", "--use_bias_in_attn_linear", "true"],
    "sinks_alternating_window": ["--attention_sinks", "true", "--sliding_window_width", "3",
                                 "--sliding_window_pattern", '["sliding", "full"]', "--num_kv_heads", "2"],
    "router_and_expert_biases": [*MOE, "--moe_router_bias", "true", "--moe_use_bias_in_experts", "true",
                                 "--moe_num_shared_experts", "2"],
    "clamped_swiglu_experts": [*MOE, "--activation", "clamped_swiglu", "--moe_router_bias", "true",
                               "--moe_use_bias_in_experts", "true", "--intermediate_size", "48"],
    "group_routing_shared": [*MOE, *GROUPS, "--moe_num_shared_experts", "1"],
    "mtp_dense": ["--mtp_num_modules", "2"],
    "mtp_mla_moe": [*MLA, *MOE, *GROUPS, "--mtp_num_modules", "1", "--activation", "swiglu", "--intermediate_size",
                    "48", "--norm", "rmsnorm"],
}


def random_base(seed: int) -> list[str]:
    """A small random GPT: width, heads, depth, vocabulary, norm, tying and positions drawn from `seed`."""
    rng = random.Random(seed)
    heads = rng.choice([2, 4])
    return ["--num_layers", str(rng.choice([2, 3])), "--hidden_size", str(heads * rng.choice([6, 8])),
            "--num_attention_heads", str(heads), "--vocab_size", str(rng.choice([50, 64, 100])),
            "--make_vocab_size_divisible_by", "4", "--pos_emb", "rotary", "--seq_length", "16",
            "--max_position_embeddings", "16", "--norm", rng.choice(["layernorm", "rmsnorm"]),
            "--use_bias_in_norms", rng.choice(["true", "false"]),
            "--no_weight_tying", rng.choice(["true", "false"])]


def built(args) -> torch.nn.Module:
    with torch.device("meta"):
        return build_gpt(args, vocab_size_of(args))


def active_from_model(model: torch.nn.Module, prefix: str = "") -> float:
    """Per token, read off the model: each MoE layer's routed experts at top_k / E, everything else whole."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, MoELayer)}
    active = 0.0
    for name, p in model.named_parameters():
        if not name.startswith(prefix):
            continue
        layer = next((m for n, m in layers.items() if name.startswith(f"{n}.experts.")), None)
        active += p.numel() * (1.0 if layer is None else layer.router.top_k / layer.num_experts)
    return active


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("switch", SWITCHES)
def test_closed_form_is_the_built_model(switch, seed):
    args = load_config([], [*random_base(seed), *SWITCHES[switch]])
    model = built(args)
    counts = count_parameters(args)
    numel = {name: p.numel() for name, p in model.named_parameters()}
    mtp = sum(n for name, n in numel.items() if name.startswith("mtp."))
    assert counts.total == sum(numel.values()) - mtp
    assert counts.mtp == mtp and (mtp > 0) == (args.mtp_num_modules > 0)
    assert counts.active == round(active_from_model(model) - active_from_model(model, "mtp."))
    assert counts.active_mtp == round(active_from_model(model, "mtp."))
    lookups = (numel["embed.weight"] if args.no_weight_tying else 0) + numel.get("pos_embed.weight", 0)
    assert counts.active_without_input_embeddings == counts.active - lookups


def test_each_switch_changes_the_count_by_its_own_parameters():
    """By hand, on one config: what a sink, a router bias, the experts' biases and an MTP module add."""
    base = ["--num_layers", "2", "--hidden_size", "16", "--num_attention_heads", "4", "--vocab_size", "64",
            "--pos_emb", "rotary", "--norm", "rmsnorm", *MOE, "--use_bias_in_mlp", "false"]
    plain = count_parameters(load_config([], base))
    d, heads, layers, experts, f = 16, 4, 2, 8, 12
    sinks = count_parameters(load_config([], [*base, "--attention_sinks", "true"]))
    assert sinks.attention - plain.attention == layers * heads
    router_bias = count_parameters(load_config([], [*base, "--moe_router_bias", "true"]))
    assert router_bias.routers - plain.routers == experts  # layer 1 only: layer 0 is dense
    expert_bias = count_parameters(load_config([], [*base, "--moe_use_bias_in_experts", "true"]))
    assert expert_bias.total - plain.total == experts * (f + d)  # layer 1's experts: up (F, gelu) and down biases
    assert expert_bias.active - plain.active == 2 * (f + d)  # top-2 of them
    mtp = count_parameters(load_config([], [*base, "--mtp_num_modules", "1"]))
    block = count_parameters(load_config([], [*base, "--num_layers", "3"])).total - plain.total  # layer 2: MoE
    assert mtp.total == plain.total and mtp.mtp == block + 3 * d + 2 * d * d  # the module's block is layer 2's
