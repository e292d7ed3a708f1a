"""Modern dense blocks against independent references: the gated MLP and GPT-NeoX's width rule, grouped-query
attention, the sliding window, and the parameter and FLOP counts of models that use them.

Shape legend: B batch, S sequence, D hidden, H query heads, K key/value heads, Dh head dim, F MLP width.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.flops import COUNTED
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron.config import ConfigError, load_config
from megatron.model.attention import Attention
from megatron.model.build import build_gpt
from megatron.model.gpt import MLP, GPTConfig, mlp_width
from megatron.sizing.flops import flops_per_token
from megatron.sizing.params import count_parameters

NEOX = Path(__file__).resolve().parents[1] / "data" / "neox"
HAND_ACT = {"swiglu": F.silu, "geglu": F.gelu}


# (activation, intermediate_size, hidden, mlp_multiple_of, F by hand from NeoX's ParallelMLP)
WIDTHS = [
    ("gelu", None, 64, 1, 256),  # 4 d
    ("gelu", 100, 64, 1, 100),
    ("swiglu", 32768, 4096, 256, 11008),  # Llama-2-7B: int(32768 * 2/3) = 21845, 10922 -> 43 x 256
    ("swiglu", 86016, 8192, 256, 28672),  # Llama-2-70B
    ("swiglu", 43008, 4096, 1, 14336),  # Mistral-7B
    ("geglu", None, 48, 1, 64),  # 4 d = 192 -> 128 up, 64 down
    ("swiglu", None, 40, 16, 64),  # 160 -> 106 up, 53 down -> 64 (up 128)
]


@pytest.mark.parametrize(("activation", "intermediate", "hidden", "multiple_of", "expected"), WIDTHS)
def test_mlp_width_follows_gpt_neox(activation, intermediate, hidden, multiple_of, expected):
    assert mlp_width(activation, intermediate, hidden, multiple_of) == expected


def test_a_width_gpt_neox_cannot_build_is_refused():
    # NeoX's shipped Mistral config: up int(14336 * 2/3) = 9557 -> 9558 columns, down 4778: shapes disagree
    with pytest.raises(ValueError, match=r"intermediate_size 14336 .*9558-column up-projection .*4778-wide"):
        mlp_width("swiglu", 14336, 4096, 1)


# (activation, hidden, intermediate_size, mlp_multiple_of, bias)
MLP_SHAPES = [("swiglu", 16, None, 1, True), ("geglu", 24, 60, 4, True), ("swiglu", 32, 96, 8, False),
              ("gelu", 16, 40, 1, False)]


@pytest.mark.parametrize(("activation", "hidden", "intermediate", "multiple_of", "bias"), MLP_SHAPES)
def test_mlp_matches_a_hand_written_reference(activation, hidden, intermediate, multiple_of, bias):
    cfg = GPTConfig(vocab_size=8, hidden_size=hidden, intermediate_size=intermediate, activation=activation,
                    mlp_multiple_of=multiple_of, use_bias_in_mlp=bias)
    width = mlp_width(activation, intermediate, hidden, multiple_of)
    g = torch.Generator().manual_seed(0)
    w_value_FD, w_gate_FD = torch.randn(width, hidden, generator=g), torch.randn(width, hidden, generator=g)
    w_down_DF = torch.randn(hidden, width, generator=g)
    b_value_F, b_gate_F, b_down_D = (torch.randn(n, generator=g) if bias else torch.zeros(n)
                                     for n in (width, width, hidden))
    x_BSD = torch.randn(2, 5, hidden, generator=g)
    mlp = MLP(cfg)
    gated = activation in HAND_ACT
    with torch.no_grad():
        mlp.up.weight.copy_(torch.cat([w_value_FD, w_gate_FD]) if gated else w_value_FD)
        mlp.down.weight.copy_(w_down_DF)
        if bias:
            mlp.up.bias.copy_(torch.cat([b_value_F, b_gate_F]) if gated else b_value_F)
            mlp.down.bias.copy_(b_down_D)
    assert (mlp.up.bias is None) == (mlp.down.bias is None) == (not bias)
    value = x_BSD @ w_value_FD.T + b_value_F
    hidden_F = value * HAND_ACT[activation](x_BSD @ w_gate_FD.T + b_gate_F) if gated else F.gelu(value)
    expected_BSD = hidden_F @ w_down_DF.T + b_down_D
    y_BSD, aux = mlp(x_BSD)
    assert aux is None
    torch.testing.assert_close(y_BSD, expected_BSD, rtol=1e-5, atol=1e-5)


def reference_attention(attn: Attention, x_BSD: torch.Tensor, window: int | None) -> torch.Tensor:
    """Explicit K/V head repetition, a softmax over hand-masked scores; multi-head splits as the old code did."""
    B, S, D = x_BSD.shape
    H, K = attn.num_heads, attn.num_kv_heads
    Dh = D // H
    qkv = x_BSD @ attn.qkv.weight.T + attn.qkv.bias
    if K == H:  # the fused layout of existing checkpoints
        q, k, v = qkv.view(B, S, 3, H, Dh).unbind(2)
    else:
        q = qkv[..., :D].view(B, S, H, Dh)
        k, v = qkv[..., D:D + K * Dh].view(B, S, K, Dh), qkv[..., D + K * Dh:].view(B, S, K, Dh)
    if attn.rotary is not None:
        q, k = (attn.rotary(t.transpose(1, 2)).transpose(1, 2) for t in (q, k))
    k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
    scores_BHSS = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(Dh)
    allowed_SS = torch.tensor([[0 <= i - j <= (S if window is None else window) for j in range(S)]
                               for i in range(S)])
    probs_BHSS = scores_BHSS.masked_fill(~allowed_SS, float("-inf")).softmax(-1)
    out_BSD = torch.einsum("bhst,bthd->bshd", probs_BHSS, v).reshape(B, S, D)
    return out_BSD @ attn.dense.weight.T + attn.dense.bias


# (hidden, query heads, kv heads, window, positional embedding)
ATTENTION_SHAPES = [(32, 4, None, None, "rotary"), (32, 4, 2, None, "rotary"), (48, 6, 1, None, "none"),
                    (32, 8, 4, 3, "rotary"), (24, 4, 4, 1, "none"), (32, 4, 2, 20, "rotary")]


@pytest.mark.parametrize(("hidden", "heads", "kv_heads", "window", "pos_emb"), ATTENTION_SHAPES)
def test_attention_matches_repeated_heads_and_a_manual_softmax(hidden, heads, kv_heads, window, pos_emb):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=8, hidden_size=hidden, num_attention_heads=heads, num_kv_heads=kv_heads,
                    sliding_window_width=window, pos_emb=pos_emb, max_position_embeddings=16)
    attn = Attention(cfg)
    kv = kv_heads or heads
    assert attn.qkv.out_features == hidden + 2 * kv * hidden // heads
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.3)
        x_BSD = torch.randn(2, 11, hidden)
        torch.testing.assert_close(attn(x_BSD), reference_attention(attn, x_BSD, window), rtol=1e-5, atol=1e-5)


# Overrides on a tiny config: each variant's closed-form count against the model built from it.
VARIANTS = [
    [], ["--activation", "swiglu", "--mlp_multiple_of", "4"], ["--activation", "geglu", "--mlp_multiple_of", "16"],
    ["--activation", "swiglu", "--use_bias_in_mlp", "false", "--intermediate_size", "96"],
    ["--num_kv_heads", "2"], ["--num_kv_heads", "1", "--use_bias_in_attn_linear", "false"],
    ["--num_kv_heads", "2", "--activation", "swiglu", "--intermediate_size", "384", "--sliding_window_width", "4",
     "--norm", "rmsnorm", "--no_weight_tying", "true"],
    ["--num_kv_heads", "2", "--moe_num_experts", "4", "--moe_expert_interval", "2", "--use_bias_in_mlp", "false"],
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: " ".join(o[::2]) or "plain")
def test_count_params_equals_the_built_model_for_each_variant(overrides):
    args = load_config(["configs/tiny.yml"], overrides)
    model = build_gpt(args, 384)
    assert count_parameters(args.model_copy(update={"vocab_size": 384})).total == sum(
        p.numel() for p in model.parameters())


# Published totals (vocab 32000): GPT-NeoX's configs with their MLP biases off, as in the released models.
PUBLISHED = [("llama2/7B.yml", [], 6_738_415_616), ("llama2/70B.yml", [], 68_976_648_192),
             ("mistral/7B.yml", ["--intermediate_size", "43008"], 7_241_732_096)]


@pytest.mark.parametrize(("name", "overrides", "total"), PUBLISHED)
def test_neox_configs_count_the_published_totals(name, overrides, total):
    args = load_config([str(NEOX / name)], ["--vocab_size", "32000", "--use_bias_in_mlp", "false", *overrides])
    assert count_parameters(args).total == total
    with torch.device("meta"):
        model = build_gpt(args, 32000)
    assert sum(p.numel() for p in model.parameters()) == total
    with_bias = load_config([str(NEOX / name)], ["--vocab_size", "32000", *overrides])  # NeoX's default: biases
    width = mlp_width("swiglu", args.intermediate_size, args.hidden_size, args.mlp_multiple_of)
    assert count_parameters(with_bias).total == total + args.num_layers * (2 * width + args.hidden_size)


def test_neox_mistral_config_as_shipped_is_one_clear_error():
    args = load_config([str(NEOX / "mistral/7B.yml")], ["--vocab_size", "32000"])
    assert (args.num_kv_heads, args.sliding_window_width) == (8, 4096)
    with pytest.raises(ValueError, match=r"intermediate_size 14336 .*needs 3 F \(43008 if 14336 is meant as the width"):
        count_parameters(args)


def test_kv_heads_must_divide_query_heads():
    with pytest.raises(ConfigError, match="num_attention_heads 4 is not divisible by num_kv_heads 3"):
        load_config(["configs/tiny.yml"], ["--num_kv_heads", "3"])


FLOP_VARIANTS = [["--num_kv_heads", "2", "--activation", "swiglu", "--intermediate_size", "300"],
                 ["--num_kv_heads", "1", "--sliding_window_width", "5"],
                 ["--num_kv_heads", "2", "--moe_num_experts", "4", "--moe_expert_interval", "2"]]


@pytest.mark.parametrize("overrides", FLOP_VARIANTS)
def test_flops_under_gqa_equal_the_counted_forward(overrides):
    args = load_config(["configs/tiny.yml"], overrides)
    model = build_gpt(args, 384)
    tokens = torch.randint(384, (2, args.seq_length))
    counter = FlopCounterMode(display=False, custom_mapping=COUNTED)  # with the experts' grouped matmuls
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(tokens)
    flops = flops_per_token(model, args.seq_length)
    assert flops.forward == pytest.approx(counter.get_total_flops() / tokens.numel(), rel=1e-9)
    # scores and values still cost per query head: 4 S d per token and layer, whatever K is
    assert flops.attention == args.num_layers * 4 * args.seq_length * args.hidden_size
