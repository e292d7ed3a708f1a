"""The top-k router and its aux losses against hand-computed values."""

import math

import pytest
import torch

from megatron.model.moe.router import TopKRouter, load_balancing_loss, z_loss


def hand_router(logits_rows: list[list[float]], top_k: int = 1, **kwargs) -> tuple[TopKRouter, torch.Tensor]:
    """A router whose gate is the identity, so token t's logits are exactly logits_rows[t]."""
    num_experts = len(logits_rows[0])
    router = TopKRouter(num_experts, num_experts, top_k, **kwargs)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router, torch.tensor(logits_rows)


def test_load_balancing_and_z_loss_on_four_tokens_two_experts():
    # logits: tokens 0, 1, 2 prefer expert 0, token 3 expert 1
    router, x = hand_router([[math.log(9), 0.0], [math.log(1.5), 0.0], [math.log(7 / 3), 0.0], [0.0, math.log(4)]])
    routing = router(x)
    # probs: [0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]; f = [3/4, 1/4]; P = [0.6, 0.4]
    # LB = 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert routing.expert_ids_TK.flatten().tolist() == [0, 0, 0, 1]
    assert routing.weights_TK.flatten().tolist() == pytest.approx([0.9, 0.6, 0.7, 0.8])
    assert routing.load_balancing_loss.item() == pytest.approx(1.1)
    # logsumexp of each row: log 10, log 2.5, log(10/3), log 5
    expected_z = sum(math.log(v) ** 2 for v in (10, 2.5, 10 / 3, 5)) / 4
    assert routing.z_loss.item() == pytest.approx(expected_z, rel=1e-5)


def test_load_balancing_counts_every_top_k_slot():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    ids = torch.tensor([[0, 1], [1, 2]])
    # f = [1/4, 2/4, 1/4], P = [0.3, 0.45, 0.25]: 3 * (0.075 + 0.225 + 0.0625) = 1.0875
    assert float(load_balancing_loss(probs, ids)) == pytest.approx(1.0875)
    assert float(z_loss(torch.zeros(3, 4))) == pytest.approx(math.log(4) ** 2)


def test_top_k_picks_the_largest_and_renormalizes():
    router, x = hand_router([[3.0, 1.0, 2.0, 0.0]], top_k=2, renormalize=True)
    routing = router(x)
    assert routing.expert_ids_TK.tolist() == [[0, 2]]
    e3, e2 = math.exp(3), math.exp(2)
    assert routing.weights_TK.tolist()[0] == pytest.approx([e3 / (e3 + e2), e2 / (e3 + e2)])
    raw, _ = hand_router([[3.0, 1.0, 2.0, 0.0]], top_k=2)
    assert raw(x).weights_TK.sum().item() < 1.0
    assert routing.probs_TE.dtype == torch.float32


def test_jitter_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(16, 4, 1, jitter_eps=0.5)
    x = torch.randn(64, 16)
    router.eval()
    assert torch.equal(router(x).probs_TE, router(x).probs_TE)
    router.train()
    assert not torch.equal(router(x).probs_TE, router(x).probs_TE)


def test_softmax_and_losses_in_fp32_for_bf16_input():
    router = TopKRouter(8, 4, 1, lbl_in_fp32=True).to(torch.bfloat16)
    routing = router(torch.randn(10, 8, dtype=torch.bfloat16))
    assert routing.probs_TE.dtype == torch.float32 and routing.load_balancing_loss.dtype == torch.float32
    assert routing.weights_TK.dtype == torch.bfloat16
