"""The routers: top-k and its aux losses against hand-computed values; Sinkhorn against a hand-written loop of
GPT-NeoX's algorithm, its marginals, and NeoX's selection and gate semantics."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.reference import reference_moe

from megatron.model.moe import MoELayer
from megatron.model.moe.router import SinkhornRouter, TopKRouter, build_router, load_balancing_loss, sinkhorn, z_loss


def hand_router(logits_rows: list[list[float]], top_k: int = 1, router=TopKRouter, **kwargs):
    """A router whose gate is the identity, so token t's logits are exactly logits_rows[t]."""
    num_experts = len(logits_rows[0])
    router = router(num_experts, num_experts, top_k, **kwargs)
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


@pytest.mark.parametrize("router_type", ["topk", "sinkhorn"])
def test_jitter_only_in_training(router_type):
    torch.manual_seed(0)
    router = build_router(router_type, 16, 4, 1, jitter_eps=0.5)
    x = torch.randn(64, 16)
    router.eval()
    assert torch.equal(router(x).probs_TE, router(x).probs_TE)
    router.train()
    assert not torch.equal(router(x).probs_TE, router(x).probs_TE)
    assert isinstance(router, {"topk": TopKRouter, "sinkhorn": SinkhornRouter}[router_type])


def test_softmax_and_losses_in_fp32_for_bf16_input():
    router = TopKRouter(8, 4, 1, lbl_in_fp32=True).to(torch.bfloat16)
    routing = router(torch.randn(10, 8, dtype=torch.bfloat16))
    assert routing.probs_TE.dtype == torch.float32 and routing.load_balancing_loss.dtype == torch.float32
    assert routing.weights_TK.dtype == torch.bfloat16


def test_unknown_router_type_and_top_k_are_clear_errors():
    with pytest.raises(ValueError, match="moe_router_type: 'expert_choice' is not one of topk, sinkhorn"):
        build_router("expert_choice", 8, 4, 1)
    with pytest.raises(ValueError, match="moe_top_k 5 must be between 1 and moe_num_experts 4"):
        build_router("sinkhorn", 8, 4, 5)


# -- Sinkhorn ----------------------------------------------------------------------------------------

def reference_sinkhorn(logits: list[list[float]], tol: float = 1e-4, max_iter: int = 3) -> list[list[float]]:
    """GPT-NeoX's sinkhorn (megatron/model/router.py there), element by element: exp, column scales started
    at 1 / (E * column sum), then per iteration row scales, column scales, and the stopping test."""
    cost = [[math.exp(v) for v in row] for row in logits]
    T, E = len(cost), len(cost[0])
    d0 = [1.0] * T
    d1 = [1.0 / (E * sum(cost[t][e] for t in range(T))) for e in range(E)]
    for _ in range(max_iter):
        before = d1
        d0 = [1.0 / T / (sum(d1[e] * cost[t][e] for e in range(E)) + 1e-8) for t in range(T)]
        d1 = [1.0 / E / (sum(d0[t] * cost[t][e] for t in range(T)) + 1e-8) for e in range(E)]
        if sum(abs(a - b) for a, b in zip(before, d1)) / E < tol:
            break
    return [[d1[e] * cost[t][e] * d0[t] for e in range(E)] for t in range(T)]


@pytest.mark.parametrize("T,E,scale,tol,max_iter", [(7, 3, 1.0, 1e-4, 3), (5, 4, 3.0, 1e-4, 3), (9, 2, 2.0, 0.0, 20),
                                                    (6, 5, 1.0, 1e-4, 1)])
def test_sinkhorn_matches_the_reference_loop(T, E, scale, tol, max_iter):
    torch.manual_seed(T * E)
    logits = torch.randn(T, E, dtype=torch.float64) * scale - 2.0
    expected = torch.tensor(reference_sinkhorn(logits.tolist(), tol, max_iter), dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(logits, tol, max_iter), expected, rtol=1e-12, atol=0)


def test_sinkhorn_marginals():
    """Rows sum to 1/T and columns to 1/E once converged (to the 1e-8 eps in the scales' denominators);
    NeoX's 3 iterations end on a column step, so the columns are exact and the rows close."""
    torch.manual_seed(0)
    T, E = 40, 6
    logits = torch.randn(T, E, dtype=torch.float64) * 2
    converged = sinkhorn(logits, tol=0.0, max_iter=500)
    torch.testing.assert_close(converged.sum(dim=1), torch.full((T,), 1 / T, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((E,), 1 / E, dtype=torch.float64), rtol=1e-5, atol=0)
    neox = sinkhorn(logits, tol=0.0)  # max_iter=3
    torch.testing.assert_close(neox.sum(dim=0), torch.full((E,), 1 / E, dtype=torch.float64), rtol=1e-5, atol=0)
    assert (neox.sum(dim=1) * T - 1).abs().max() < 0.5


def test_sinkhorn_stops_on_an_absolute_tolerance_as_in_neox():
    """The stopping test is on d1 itself (~ 1 / (E * sum exp)): for a realistic batch it holds after one
    iteration; for a handful of tokens with small logits all three run."""
    torch.manual_seed(1)
    big = torch.randn(4096, 8)
    assert torch.equal(sinkhorn(big), sinkhorn(big, max_iter=1))
    small = torch.randn(6, 3, dtype=torch.float64) * 2 - 3
    assert not torch.allclose(sinkhorn(small), sinkhorn(small, max_iter=2))
    assert torch.equal(sinkhorn(small), sinkhorn(small, tol=0.0, max_iter=3))


def test_sinkhorn_routes_balanced_in_training_and_by_score_in_eval():
    """All four tokens prefer expert 0; Sinkhorn sends the two weakest to expert 1. The gate is the chosen
    expert's sigmoid (top-1) in both modes; eval routes by the scores alone."""
    rows = [[2.0, 0.0], [1.5, 0.0], [1.0, 0.0], [0.5, 0.0]]
    router, x = hand_router(rows, router=SinkhornRouter)
    balanced = torch.tensor(reference_sinkhorn(rows)).argmax(dim=1)
    assert balanced.tolist() == [0, 0, 1, 1]
    routing = router(x)
    assert routing.expert_ids_TK.flatten().tolist() == [0, 0, 1, 1]
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    assert routing.weights_TK.flatten().tolist() == pytest.approx([sigmoid(2.0), sigmoid(1.5), 0.5, 0.5])
    assert routing.tokens_per_expert_E.tolist() == [2, 2]
    assert routing.load_balancing_loss.item() == 0.0 and not routing.load_balancing_loss.requires_grad
    expected_z = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in rows) / 4
    assert routing.z_loss.item() == pytest.approx(expected_z, rel=1e-5)
    router.eval()
    routing = router(x)
    assert routing.expert_ids_TK.flatten().tolist() == [0, 0, 0, 0]
    assert routing.weights_TK.flatten().tolist() == pytest.approx([sigmoid(v[0]) for v in rows])


def test_sinkhorn_top_k_gates_are_the_full_softmax_not_renormalised():
    torch.manual_seed(2)
    router = SinkhornRouter(8, 5, 2)
    x = torch.randn(30, 8, requires_grad=True)
    routing = router(x)
    logits = (x @ router.gate.weight.T).detach()
    expected_ids = torch.topk(torch.tensor(reference_sinkhorn(logits.tolist())), 2, dim=1).indices
    assert torch.equal(routing.expert_ids_TK, expected_ids)
    torch.testing.assert_close(routing.weights_TK, F.softmax(logits, dim=-1).gather(1, expected_ids))
    assert (routing.weights_TK.sum(dim=1) < 1).all()
    routing.weights_TK.sum().backward()  # the router learns through the gates; Sinkhorn itself has no gradient
    assert router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_layer_with_sinkhorn_matches_the_per_token_reference(top_k, activation):
    torch.manual_seed(3 + top_k)
    layer = MoELayer.build(16, 32, 4, top_k, activation, init_std=0.3, output_init_std=0.3, router_type="sinkhorn")
    x = torch.randn(20, 16)
    logits = x @ layer.router.gate.weight.T
    scores = torch.sigmoid(logits) if top_k == 1 else F.softmax(logits, dim=-1)
    ids = torch.topk(torch.tensor(reference_sinkhorn(logits.tolist())), top_k, dim=1).indices
    y, aux = layer(x)
    torch.testing.assert_close(y, reference_moe(layer, x, activation, (scores.gather(1, ids), ids)),
                               rtol=1e-4, atol=1e-5)
    assert aux.load_balancing_loss.item() == 0.0
    layer.eval()
    eval_reference = reference_moe(layer, x, activation, torch.topk(scores, top_k, dim=1))
    torch.testing.assert_close(layer(x)[0], eval_reference, rtol=1e-4, atol=1e-5)
