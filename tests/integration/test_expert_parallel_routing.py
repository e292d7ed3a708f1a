"""DeepSeek-V3's and gpt-oss's routing pieces under expert parallelism: the MoE layer on 2 gloo ranks (EP=2) equals
one rank, with group-limited choice laid out one group per rank, scaled sigmoid gates and the loss-free bias, a
router bias, experts (and shared experts) with biases, the clamped SwiGLU, LoREs and token dropping. Outputs and
every gradient in float64.

Shape suffixes: T tokens, D hidden width, E experts, U an expert's up-projection width."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers.distributed import assert_grads_match_one_rank, run_on_ranks

from megatron.model.activations import Activation
from megatron.model.moe import Balancing, Capacity, LoREConfig, MoELayer
from megatron.parallel.expert_parallel import ExpertParallel

CLAMPED = Activation("clamped_swiglu", alpha=1.702, limit=1.5)  # a low limit: the clamps act on these inputs
DEEPSEEK = dict(num_experts=8, top_k=3, activation="swiglu", router_type="topk", score_function="sigmoid",
                balancing=Balancing(bias=True), num_groups=2, group_top_k=1, scaling_factor=2.5,
                num_shared_experts=1)
GPT_OSS = dict(num_experts=6, top_k=2, activation=CLAMPED, router_type="topk", renormalize=True, router_bias=True,
               expert_biases=True)
CASES = {
    "deepseek_groups": DEEPSEEK,
    "deepseek_groups_keep_both": DEEPSEEK | dict(group_top_k=2),
    "gpt_oss": GPT_OSS,
    "gpt_oss_shared_entangled_lores": GPT_OSS | dict(num_shared_experts=1, lore=LoREConfig(3, 2, top_l=1)),
    "gpt_oss_standalone_lores_capacity": GPT_OSS | dict(lore=LoREConfig(3, 2, top_l=2, mode="standalone"),
                                                        capacity=Capacity(0.75, 0.75, 1)),
    "groups_and_biases_capacity_probs": DEEPSEEK | dict(router_bias=True, expert_biases=True, activation=CLAMPED,
                                                        capacity=Capacity(0.5, 0.5, 1, "probs")),
}


def _set_biases(layer: MoELayer) -> None:
    """Non-zero biases, drawn for all E experts and sliced to the layer's own (so every layout gets the same)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name in ("experts.b_up_EU", "experts.b_down_ED"):
                full = torch.randn((layer.num_experts, param.shape[1]), generator=gen, dtype=param.dtype)
                param.copy_(full[layer.local_experts.start:layer.local_experts.stop])
            elif name.endswith("bias"):  # the router's and the shared experts' (replicated)
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.5)
        if layer.router.balancing.bias:
            layer.router.expert_bias_E.copy_(torch.randn(layer.num_experts, generator=gen) * 0.05)


def _compare(rank: int, world: int, name: str) -> None:
    ep = ExpertParallel(world, rank, dist.group.WORLD)
    layers = []
    for expert_parallel in (None, ep):
        torch.manual_seed(0)
        layer = MoELayer.build(hidden_size=16, ffn_hidden_size=12, **CASES[name], expert_parallel=expert_parallel,
                               init_std=0.5, output_init_std=0.3)
        _set_biases(layer)
        layers.append(layer.eval())  # eval: the capacity's eval factor; no jitter (none is set either way)
    full, part = layers
    torch.manual_seed(1)
    x_TD = torch.randn(world * 12, 16)
    weights_T1 = torch.linspace(-1.0, 1.0, x_TD.shape[0]).unsqueeze(1)
    halves = [slice(r * 12, (r + 1) * 12) for r in range(world)]
    outputs = [full(x_TD[half]) for half in halves]
    sum(((y * weights_T1[half]).sum() + aux.lore_balancing_loss for (y, aux), half in zip(outputs, halves))).backward()
    mine = halves[rank]
    y_part, aux_part = part(x_TD[mine])
    ((y_part * weights_T1[mine]).sum() + aux_part.lore_balancing_loss).backward()
    torch.testing.assert_close(y_part, outputs[rank][0], atol=1e-10, rtol=1e-10)
    assert y_part.abs().mean() > 0.05
    if name.startswith("deepseek"):  # one group per rank: with group_top_k 1 no token leaves for the other rank's
        crossing = aux_part.dispatch_stats["exchange_bytes_sent"]
        ids_TK = part.router(x_TD[mine]).expert_ids_TK
        groups_T = (ids_TK // 4).unique(dim=1) if CASES[name]["group_top_k"] == 1 else None
        if groups_T is not None:
            assert groups_T.shape[1] == 1  # every token's experts lie in one group
            off_rank = int((ids_TK // 4 != rank).sum())
            assert crossing == off_rank * 16 * 8  # rows of 16 float64
    assert_grads_match_one_rank(full, part, name)


def _compare_every_case(rank: int, world: int) -> None:
    torch.set_default_dtype(torch.float64)  # so that only a real difference, not rounding, can fail
    for name in CASES:
        try:
            _compare(rank, world, name)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err


@pytest.mark.slow  # two spawned processes and six layouts: longer than the default suite allows
def test_groups_and_biases_on_two_ranks_equal_one_rank():
    run_on_ranks(_compare_every_case, 2)
