"""DeepSeek-V3's routing: group-limited choice against a per-token loop, the scaled gates, the settings' errors,
and the whole MoE block (routed + shared experts, sigmoid + expert bias, groups, scaling) against transformers'
DeepseekV3MoE with copied weights.

Shape legend: T tokens, D hidden, E experts, K experts per token, F an expert's width (DeepSeek's I).
"""

from __future__ import annotations

import pytest
import torch

from megatron.config import ConfigError, load_config
from megatron.model.moe import Balancing, MoELayer
from megatron.model.moe.router import build_router, choose_top_k

MOE = ["--moe_num_experts", "8", "--moe_top_k", "2", "--moe_router_type", "topk"]


def per_token_choice(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int, groups: int, group_top_k: int
                     ) -> list[dict[int, float]]:
    """Token by token, as DeepSeek-V3 describes it: a group's score is the sum of its two best biased scores; the
    token keeps its best `group_top_k` groups and takes the k best biased scores among their experts; each chosen
    expert's gate is its unbiased score. Returns {expert: gate} per token."""
    T, E = scores_TE.shape
    size = E // groups
    chosen = []
    for t in range(T):
        biased = [float(scores_TE[t, e] + bias_E[e]) for e in range(E)]
        group_scores = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(groups)]
        kept_groups = sorted(range(groups), key=lambda g: -group_scores[g])[:group_top_k]
        candidates = [e for g in kept_groups for e in range(g * size, (g + 1) * size)]
        experts = sorted(candidates, key=lambda e: -biased[e])[:k]
        chosen.append({e: float(scores_TE[t, e]) for e in experts})
    return chosen


@pytest.mark.parametrize(("E", "K", "groups", "group_top_k"), [(8, 2, 4, 2), (16, 4, 8, 3), (12, 3, 3, 1),
                                                                (6, 2, 6, 3), (8, 3, 1, 1)])
@pytest.mark.parametrize("biased", [False, True])
def test_group_limited_choice_matches_the_per_token_loop(E, K, groups, group_top_k, biased):
    torch.manual_seed(E + K + groups)
    scores_TE = torch.rand(40, E)
    bias_E = torch.randn(E) * 0.3 if biased else torch.zeros(E)
    gates_TK, ids_TK, _ = choose_top_k(scores_TE, K, bias_E if biased else None, groups, group_top_k)
    expected = per_token_choice(scores_TE, bias_E, K, groups, group_top_k)
    for t in range(40):
        got = {int(e): float(g) for e, g in zip(ids_TK[t], gates_TK[t])}
        assert got == pytest.approx(expected[t]), t


def test_groups_change_the_choice_and_bound_the_groups_a_token_reaches():
    """The limit is not vacuous: with one group kept, a token's experts all lie in one group, and some tokens
    choose differently from the unlimited top-k."""
    torch.manual_seed(0)
    scores_TE = torch.rand(200, 16)
    _, limited_TK, _ = choose_top_k(scores_TE, 4, None, num_groups=4, group_top_k=1)
    _, free_TK, _ = choose_top_k(scores_TE, 4, None)
    assert ((limited_TK // 4) == (limited_TK[:, :1] // 4)).all()
    assert (limited_TK.sort(dim=1).values != free_TK.sort(dim=1).values).any(dim=1).float().mean() > 0.5


def test_router_gates_are_normalised_then_scaled():
    torch.manual_seed(1)
    router = build_router("topk", 16, 8, 3, score_function="sigmoid", num_groups=4, group_top_k=2,
                          scaling_factor=2.5, init_std=0.5).eval()
    x_TD = torch.randn(20, 16)
    routing = router(x_TD)
    scores_TE = torch.sigmoid(x_TD @ router.gate.weight.T)
    chosen_TK = scores_TE.gather(1, routing.expert_ids_TK)
    torch.testing.assert_close(routing.weights_TK, 2.5 * chosen_TK / chosen_TK.sum(dim=1, keepdim=True))
    torch.testing.assert_close(routing.weights_TK.sum(dim=1), torch.full((20,), 2.5))


@pytest.mark.parametrize(("overrides", "message"), [
    (["--moe_router_num_groups", "3"], r"moe_router_num_groups 3 must divide moe_num_experts 8"),
    (["--moe_router_num_groups", "4", "--moe_router_group_top_k", "5"],
     r"moe_router_group_top_k 5 must be between 1 and moe_router_num_groups 4"),
    (["--moe_router_num_groups", "4", "--moe_top_k", "3"],
     r"moe_top_k 3 exceeds the experts of the groups a token keeps: moe_router_group_top_k 1 x 2 experts per "
     r"group = 2"),
    (["--moe_router_group_top_k", "2"], r"moe_router_group_top_k: 2 cannot act .*needs moe_router_num_groups > 1"),
    (["--moe_router_type", "sinkhorn", "--moe_router_num_groups", "2"],
     r"moe_router_num_groups: 2 cannot act .*needs moe_router_type: topk"),
    (["--moe_router_scaling_factor", "0"], r"moe_router_scaling_factor: .*greater than 0"),
])
def test_bad_group_settings_are_one_line_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config([], [*MOE, *overrides])
    assert "\n" not in str(err.value)


def test_good_group_settings_load():
    args = load_config([], [*MOE, "--moe_router_num_groups", "4", "--moe_router_group_top_k", "2",
                            "--moe_router_scaling_factor", "2.5"])
    assert (args.moe_router_num_groups, args.moe_router_group_top_k, args.moe_router_scaling_factor) == (4, 2, 2.5)


# -- against transformers' DeepseekV3MoE ------------------------------------------------------------------------

def deepseek_pair(E=8, K=3, groups=4, group_top_k=2, shared=2, D=32, F=16, scaling=2.5):
    """transformers' DeepseekV3MoE with random weights and correction bias, and our MoELayer with them copied."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(
        hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K, n_group=groups,
        topk_group=group_top_k, routed_scaling_factor=scaling, n_shared_experts=shared, norm_topk_prob=True,
        hidden_act="silu")
    config._experts_implementation = "eager"  # transformers' per-expert loop, the reference
    theirs = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        theirs.gate.e_score_correction_bias.uniform_(-0.2, 0.2)
    ours = MoELayer.build(D, F, E, K, "swiglu", router_type="topk", score_function="sigmoid",
                          balancing=Balancing(bias=True), num_groups=groups, group_top_k=group_top_k,
                          scaling_factor=scaling, num_shared_experts=shared).eval()
    with torch.no_grad():
        ours.router.gate.weight.copy_(theirs.gate.weight)
        ours.router.expert_bias_E.copy_(theirs.gate.e_score_correction_bias)
        gate_EFD, up_EFD = theirs.experts.gate_up_proj.chunk(2, dim=1)  # rows: gate then up; ours [value | gate]
        ours.experts.w_up_EDF.copy_(torch.cat([up_EFD, gate_EFD], dim=1).transpose(1, 2))
        ours.experts.w_down_EFD.copy_(theirs.experts.down_proj.transpose(1, 2))
        mlp = theirs.shared_experts
        ours.shared_experts.up.weight.copy_(torch.cat([mlp.up_proj.weight, mlp.gate_proj.weight]))
        ours.shared_experts.down.weight.copy_(mlp.down_proj.weight)
    return theirs, ours


@pytest.mark.parametrize(("E", "K", "groups", "group_top_k", "shared"), [(8, 3, 4, 2, 2), (16, 4, 8, 3, 1),
                                                                         (8, 2, 1, 1, 1)])
def test_moe_block_equals_transformers_deepseek_v3(E, K, groups, group_top_k, shared):
    torch.manual_seed(E * K + groups)
    theirs, ours = deepseek_pair(E, K, groups, group_top_k, shared)
    # the shared experts' width: n_shared_experts x moe_intermediate_size there, num_shared x F here
    assert ours.shared_experts.down.weight.shape == theirs.shared_experts.down_proj.weight.shape == (32, shared * 16)
    x_BSD = torch.randn(3, 7, 32)
    with torch.no_grad():
        _, weights_TK, ids_TK = theirs.gate(x_BSD)
        routing = ours.router(x_BSD.reshape(-1, 32))
        torch.testing.assert_close(routing.expert_ids_TK.sort(dim=1).values, ids_TK.sort(dim=1).values,
                                   rtol=0, atol=0)
        torch.testing.assert_close(routing.weights_TK.gather(1, routing.expert_ids_TK.argsort(dim=1)),
                                   weights_TK.gather(1, ids_TK.argsort(dim=1)), rtol=1e-5, atol=1e-5)
        y_ours, _ = ours(x_BSD)
        y_theirs = theirs(x_BSD)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    assert y_theirs.abs().mean() > 0.1  # a non-trivial output


def test_the_comparison_sees_the_groups_and_the_scaling():
    """Each of groups, scaling and the correction bias changes the block's output, so the equality above checks
    them (the same layer without one of them differs from transformers')."""
    torch.manual_seed(3)
    theirs, ours = deepseek_pair(16, 4, 8, 2, 1)
    x_TD = torch.randn(64, 32)
    with torch.no_grad():
        y_theirs = theirs(x_TD.unsqueeze(0)).squeeze(0)
        for change in ("groups", "scaling", "bias"):
            router = ours.router
            saved = router.num_groups, router.scaling_factor, router.expert_bias_E.clone()
            if change == "groups":
                router.num_groups = 1
            elif change == "scaling":
                router.scaling_factor = 1.0
            else:
                router.expert_bias_E.zero_()
            assert not torch.allclose(ours(x_TD)[0], y_theirs, rtol=1e-3, atol=1e-3), change
            router.num_groups, router.scaling_factor = saved[:2]
            router.expert_bias_E.copy_(saved[2])
        torch.testing.assert_close(ours(x_TD)[0], y_theirs, rtol=1e-5, atol=1e-5)
