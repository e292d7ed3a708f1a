"""Model FLOPs per token against torch's FlopCounterMode on a real forward (math attention, and the grouped
matmuls counted by their definition): exact for dense, MoE and every StructMoE mode, gated or not, with shared
experts and with the Sinkhorn router."""

import pytest
import torch
from helpers.flops import COUNTED
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron.config import load_config
from megatron.model.build import build_gpt
from megatron.sizing.flops import data_sheet_peak, flops_per_token

CONFIGS = ["tiny.yml", "tiny_moe.yml", "tiny_structmoe.yml", "tiny_structmoe_router_free.yml",
           "tiny_structmoe_standalone.yml"]


# every layer MoE: the gated dense MLP is not this test's business
GATED_SHARED_SINKHORN = ["--activation", "swiglu", "--moe_expert_interval", "1", "--moe_first_layer", "0",
                         "--moe_num_shared_experts", "2", "--moe_router_type", "sinkhorn"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("overrides", [[], ["--moe_top_k", "2", "--lore_top_k", "2"], GATED_SHARED_SINKHORN],
                         ids=["as_shipped", "top2", "gated_shared_sinkhorn"])
def test_flops_per_token_equal_the_counted_forward(config, overrides):
    if "--lore_top_k" in overrides and ("structmoe" not in config or "router_free" in config):  # no LoRE router
        overrides = overrides[:2]
    if config == "tiny.yml":
        overrides = []
    args = load_config([f"configs/{config}"], overrides)
    model = build_gpt(args, 384)
    tokens = torch.randint(384, (2, args.seq_length))
    counter = FlopCounterMode(display=False, custom_mapping=COUNTED)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(tokens)
    expected = counter.get_total_flops() / tokens.numel()
    flops = flops_per_token(model, args.seq_length)
    assert flops.forward == pytest.approx(expected, rel=1e-9)
    assert flops.training == 3 * flops.forward
    if args.is_moe:
        assert flops.experts > 0
    if args.lore_num_experts:
        assert flops.lores > 0


@pytest.mark.parametrize("activation", ["gelu", "geglu"])
def test_shared_experts_count_as_dense(activation):
    """Each MoE layer's shared experts add 2 x their weights to the dense FLOPs; routed FLOPs do not move."""
    overrides = ["--activation", activation, "--moe_expert_interval", "1", "--moe_first_layer", "0"]
    args = load_config(["configs/tiny_structmoe.yml"], overrides)
    shared = load_config(["configs/tiny_structmoe.yml"], [*overrides, "--moe_num_shared_experts", "3"])
    base, with_shared = (flops_per_token(build_gpt(a, 384), a.seq_length) for a in (args, shared))
    d, f = args.hidden_size, args.intermediate_size or 4 * args.hidden_size
    up = (2 if activation == "geglu" else 1) * 3 * f
    assert with_shared.dense - base.dense == args.num_layers * 2 * d * (up + 3 * f)
    assert (with_shared.experts, with_shared.lores, with_shared.attention) == (base.experts, base.lores, base.attention)


def test_dense_closed_form_by_hand():
    args = load_config(["configs/tiny.yml"])
    model = build_gpt(args, 384)
    d, f, L, S, V = args.hidden_size, args.intermediate_size, args.num_layers, args.seq_length, 384
    by_hand = L * (2 * d * 3 * d + 2 * d * d + 2 * 2 * d * f + 4 * S * d) + 2 * d * V
    assert flops_per_token(model, S).forward == by_hand


def test_training_logs_tflops_and_mfu(tmp_path, data_prefix):
    from helpers.runs import read_metrics, write_config

    import train

    config = write_config(tmp_path, data_prefix, train_iters=4, log_interval=2, eval_interval=0, peak_tflops=0.5,
                          checkpoint_factor=100, pos_emb="rotary")
    train.run([str(config)])
    args = load_config([str(config)])
    per_token = flops_per_token(build_gpt(args, 384), args.seq_length).training
    for record in [r for r in read_metrics(tmp_path / "logs") if "loss" in r]:
        assert record["tflops_per_rank"] == pytest.approx(record["tokens_per_sec"] * per_token / 1e12, rel=1e-6)
        assert record["mfu"] == pytest.approx(record["tflops_per_rank"] / 0.5, rel=1e-9)


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),  # SXM
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H100 NVL", "bfloat16", 835.0),
    ("NVIDIA H100 NVL", "fp32", 60.0),
    ("NVIDIA H200", "bfloat16", 989.0),
    ("NVIDIA H200 NVL", "bfloat16", 835.0),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("NVIDIA GeForce RTX 4090", "bfloat16", None),  # unknown: the caller measures a matmul instead
])
def test_data_sheet_peaks_tell_the_h100_boards_apart(name, precision, expected):
    assert data_sheet_peak(name, precision) == expected


MLA = ["--kv_lora_rank", "16", "--qk_nope_head_dim", "8", "--qk_rope_head_dim", "4", "--v_head_dim", "6",
       "--pos_emb", "rotary", "--rotary_pct", "1.0", "--use_bias_in_attn_linear", "false"]
NEW_ATTENTION = {
    "mla_query_latent": [*MLA, "--q_lora_rank", "12"],
    "mla_direct_query": MLA,
    "wide_heads_sinks_windows": ["--head_dim", "24", "--num_kv_heads", "2", "--attention_sinks", "true",
                                 "--sliding_window_width", "5", "--sliding_window_pattern", '["sliding", "full"]',
                                 "--pos_emb", "rotary"],
}


@pytest.mark.parametrize("variant", NEW_ATTENTION)
def test_new_attention_flops_equal_the_counted_forward(variant):
    """Multi-head latent attention (scores over nope + rope dims, values over v_head_dim, which differ), heads
    wider than hidden / heads, sinks and alternating windows, on an MoE config: the walk against FlopCounterMode,
    and MLA's attention term by hand."""
    args = load_config(["configs/tiny_moe.yml"], NEW_ATTENTION[variant])
    model = build_gpt(args, 384)
    tokens = torch.randint(384, (2, args.seq_length))
    counter = FlopCounterMode(display=False, custom_mapping=COUNTED)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(tokens)
    flops = flops_per_token(model, args.seq_length)
    assert flops.forward == pytest.approx(counter.get_total_flops() / tokens.numel(), rel=1e-9)
    if args.kv_lora_rank:
        S, H = args.seq_length, args.num_attention_heads
        assert flops.attention == args.num_layers * 2 * S * H * ((8 + 4) + 6)


def test_mtp_modules_flops_equal_the_counted_training_forward():
    """With multi-token prediction (an MoE block per module, MLA), the training forward's FLOPs: the main model's
    kinds as without MTP, `mtp` the modules' projections, blocks and head passes (module d on S - d positions;
    the counted forward is compared with each module's share scaled by its positions)."""
    args = load_config(["configs/tiny_moe.yml"], [*MLA, "--mtp_num_modules", "2", "--moe_expert_interval", "1",
                                                  "--moe_router_type", "topk"])
    model = build_gpt(args, 384).train()
    plain = flops_per_token(build_gpt(load_config(["configs/tiny_moe.yml"], [
        *MLA, "--moe_expert_interval", "1", "--moe_router_type", "topk"]), 384), args.seq_length)
    flops = flops_per_token(model, args.seq_length)
    assert (flops.dense, flops.attention, flops.experts, flops.head) == (
        plain.dense, plain.attention, plain.experts, plain.head)
    S, B = args.seq_length, 2
    tokens = torch.randint(384, (B, S))
    counter = FlopCounterMode(display=False, custom_mapping=COUNTED)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(tokens, targets_BS=tokens, mtp=True)
    per_module = flops.mtp / 2
    # a module on R = S - d positions: its linear and expert work scales with R, its attention with R^2
    attention_per_token = plain.attention / args.num_layers
    expected = B * S * (plain.forward) + sum(
        B * (S - d) * (per_module - attention_per_token) + B * (S - d) ** 2 / S * attention_per_token
        for d in (1, 2))
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
