"""The MoE layer against naive per-token references, over a table of shapes."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.model.moe import LoREConfig, MoELayer, moe_param_counts
from megatron.model.moe.experts import grouped_matmul
from megatron.model.moe.router import load_balancing_loss, z_loss

# (tokens, hidden, ffn, experts, top_k)
SHAPES = [(1, 8, 16, 2, 1), (7, 16, 32, 4, 2), (33, 16, 48, 8, 1), (64, 32, 64, 8, 2), (5, 16, 32, 8, 1)]


def reference_moe(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token: route, run each chosen expert's MLP, add its LoRE term, weight, sum."""
    probs = F.softmax(x_TD @ layer.router.gate.weight.T, dim=-1)
    weights, ids = torch.topk(probs, layer.router.top_k, dim=-1)
    w_up, w_down = layer.experts.w_up_EDF, layer.experts.w_down_EFD
    lore = layer.lore
    out = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        y = torch.zeros_like(x)
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = x @ w_up[e]
            extra_out = 0
            if lore is not None:
                if lore.routed:
                    M = lore.lores_per_expert
                    lore_logits = x @ lore.router.weight[e * M:(e + 1) * M].T
                    pi = F.softmax(lore_logits, dim=-1)
                    pis, chosen = torch.topk(pi, lore.config.top_l)
                    if lore.config.renormalize:
                        pis = pis / pis.sum()
                    term = sum(pis[j] * (x @ lore.A[e, int(i)]) @ lore.B[e, int(i)] for j, i in enumerate(chosen))
                else:
                    term = (x @ lore.A[e, 0]) @ lore.B[e, 0]
                if lore.entangled:
                    h = h + term
                else:
                    extra_out = term
            y = y + weights[t, k] * (F.gelu(h) @ w_down[e] + extra_out)
        out.append(y)
    return torch.stack(out)


def check_against_reference(layer: MoELayer, T: int, D: int):
    x = torch.randn(T, D, requires_grad=True)
    y, _ = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference_moe(layer, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(y, [x] + params, grad_out, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x_ref] + params, grad_out, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None:
            continue
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("T,D,Fd,E,K", SHAPES)
def test_dropless_moe_matches_per_token_reference(T, D, Fd, E, K, use_grouped_mm):
    torch.manual_seed(T + E)
    layer = MoELayer(D, Fd, E, K, init_std=0.3, output_init_std=0.3, use_grouped_mm=use_grouped_mm)
    check_against_reference(layer, T, D)


LORE_CASES = [
    LoREConfig(4, 4, 1, "entangled"),
    LoREConfig(4, 4, 2, "entangled"),
    LoREConfig(3, 2, 2, "entangled", renormalize=True),
    LoREConfig(4, 4, 1, "router_free"),
    LoREConfig(4, 4, 1, "standalone"),
    LoREConfig(4, 4, 3, "standalone"),
]


@pytest.mark.parametrize("lore", LORE_CASES, ids=lambda c: f"{c.mode}-M{c.num_lores}-r{c.rank}-l{c.top_l}")
@pytest.mark.parametrize("T,D,Fd,E,K", SHAPES[1:4])
def test_lore_layer_matches_per_token_reference(T, D, Fd, E, K, lore):
    torch.manual_seed(T)
    layer = MoELayer(D, Fd, E, K, lore=lore, init_std=0.3, output_init_std=0.3)
    with torch.no_grad():
        layer.lore.B.normal_(std=0.3)  # make the LoRE term as large as the expert's, to test it properly
    check_against_reference(layer, T, D)


def test_grouped_matmul_paths_agree_with_empty_groups():
    x = torch.randn(10, 16)
    w = torch.randn(4, 16, 8)
    counts = torch.tensor([3, 0, 7, 0])
    torch.testing.assert_close(grouped_matmul(x, w, counts, True), grouped_matmul(x, w, counts, False))
    expected = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    torch.testing.assert_close(grouped_matmul(x, w, counts, True), expected)


def test_entangled_output_equals_materialised_eq1():
    """Eq. 2 (what the layer computes) equals Eq. 1: x (W_up + sum_i pi_i A_i B_i) with the same pi."""
    torch.manual_seed(0)
    D, Fd, E, M, R = 16, 32, 2, 4, 4
    layer = MoELayer(D, Fd, E, 1, lore=LoREConfig(M, R, 2), init_std=0.3, output_init_std=0.3)
    with torch.no_grad():
        layer.lore.B.normal_(std=0.3)
    x = torch.randn(9, D)
    y, _ = layer(x)
    gate = F.softmax(x @ layer.router.gate.weight.T, dim=-1)
    g, e_ids = gate.max(dim=-1)
    for t in range(9):
        e = int(e_ids[t])
        pi = F.softmax(x[t] @ layer.lore.router.weight[e * M:(e + 1) * M].T, dim=-1)
        top = torch.topk(pi, 2)
        w_eff = layer.experts.w_up_EDF[e] + sum(
            p * layer.lore.A[e, int(i)] @ layer.lore.B[e, int(i)] for p, i in zip(top.values, top.indices)
        )
        expected = g[t] * F.gelu(x[t] @ w_eff) @ layer.experts.w_down_EFD[e]
        torch.testing.assert_close(y[t], expected, rtol=1e-4, atol=1e-5)


def test_top_l_selection_and_pi_on_hand_built_router():
    D, E, M = 4, 1, 3
    layer = MoELayer(D, 8, 2, 1, lore=LoREConfig(M, 4, 2))
    with torch.no_grad():
        layer.lore.router.weight.zero_()
        # every expert's LoRE logits for x = e_0 are [2, 0, 1]: LoREs 0 and 2 win, pi = softmax([2, 0, 1])
        layer.lore.router.weight[0:3, 0] = torch.tensor([2.0, 0.0, 1.0])
        layer.lore.router.weight[3:6, 0] = torch.tensor([2.0, 0.0, 1.0])
    x = torch.zeros(1, D)
    x[0, 0] = 1.0
    plan = layer.lore.plan(x, torch.tensor([1, 0]))
    softmax = [math.exp(2) / (math.exp(2) + 1 + math.exp(1)), math.exp(1) / (math.exp(2) + 1 + math.exp(1))]
    assert plan.rows_per_group_G.tolist() == [1, 0, 1, 0, 0, 0]  # expert 0: LoREs 0 and 2
    assert plan.pi_slots.tolist() == pytest.approx(softmax)
    assert plan.aux["lore_load_EM"][0].tolist() == pytest.approx([0.5, 0.0, 0.5])
    del E


def test_gradients_reach_every_part():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, 2, lore=LoREConfig(4, 4, 1))
    y, aux = layer(torch.randn(20, 16))
    (y.square().mean() + aux.load_balancing_loss + aux.z_loss).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["entangled", "router_free", "standalone"])
def test_lore_shapes_and_parameter_counts(mode):
    D, Fd, E, M, R = 16, 48, 4, 8, 4
    lore = LoREConfig(M, R, 1, mode)
    layer = MoELayer(D, Fd, E, 1, lore=lore)
    expected_shapes = {
        "entangled": ((E, M, D, R), (E, M, R, Fd)),
        "router_free": ((E, 1, D, M * R), (E, 1, M * R, Fd)),
        "standalone": ((E, M, D, R), (E, M, R, D)),
    }[mode]
    assert (tuple(layer.lore.A.shape), tuple(layer.lore.B.shape)) == expected_shapes
    lore_params = {"entangled": E * M * R * (D + Fd), "router_free": E * M * R * (D + Fd),
                   "standalone": E * M * R * 2 * D}[mode]
    lore_router = 0 if mode == "router_free" else D * E * M
    counts = moe_param_counts(D, Fd, E, lore)
    assert counts == {"experts": 2 * E * D * Fd, "lores": lore_params, "routers": D * E + lore_router}
    assert sum(p.numel() for p in layer.parameters()) == sum(counts.values())


def test_aux_losses_on_a_hand_computed_case():
    # 4 tokens, 2 experts. Probabilities chosen so top-1 sends tokens 0,1,2 to expert 0 and 3 to expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    ids = probs.argmax(dim=-1, keepdim=True)
    # f = [3/4, 1/4], P = [0.6, 0.4]: 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert float(load_balancing_loss(probs, ids)) == pytest.approx(1.1)
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # logsumexp = log 2 and 1 + log 2
    assert float(z_loss(logits)) == pytest.approx((math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2)


def test_layer_reports_loads_and_keeps_shape():
    layer = MoELayer(16, 32, 4, 2, lore=LoREConfig(4, 4, 1))
    y, aux = layer(torch.randn(3, 5, 16))
    assert y.shape == (3, 5, 16)
    assert float(aux.expert_load_E.sum()) == pytest.approx(1.0)
    loads = aux.lore_load_EM.sum(dim=1)
    assert torch.all(((loads - 1).abs() < 1e-6) | (loads == 0))
