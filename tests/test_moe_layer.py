"""The MoE layer against naive per-token references, over a table of shapes."""

import pytest
import torch
import torch.nn.functional as F

from megatron.model.moe import LocalDispatcher, LoREConfig, MoELayer
from megatron.model.moe.stats import normalized_entropy, routing_stats

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


def test_layer_reports_loads_and_keeps_shape():
    layer = MoELayer(16, 32, 4, 2, lore=LoREConfig(4, 4, 1))
    y, aux = layer(torch.randn(3, 5, 16))
    assert y.shape == (3, 5, 16)
    assert float(aux.expert_load_E.sum()) == pytest.approx(1.0)
    loads = aux.lore_load_EM.sum(dim=1)
    assert torch.all(((loads - 1).abs() < 1e-6) | (loads == 0))


def test_empty_experts_and_a_single_token():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, 1, lore=LoREConfig(4, 4, 1), init_std=0.3, output_init_std=0.3)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2, 0] = 5.0  # every token with x[0] > 0 goes to expert 2
    x = torch.randn(9, 16)
    x[:, 0] = x[:, 0].abs() + 1
    _, aux = layer(x)
    assert aux.expert_load_E.tolist() == [0.0, 0.0, 1.0, 0.0]
    check_against_reference(layer, 9, 16)
    check_against_reference(layer, 1, 16)


def test_dispatch_then_combine_with_identity_experts_gives_the_gate_sum():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2)
    x = torch.randn(13, 8)
    routing = layer.router(x)
    dispatcher = LocalDispatcher()
    x_ND, tokens_per_expert, ctx = dispatcher.dispatch(x, routing)
    assert tokens_per_expert.sum() == 26 and x_ND.shape == (26, 8)
    expert_of_row = torch.repeat_interleave(torch.arange(4), tokens_per_expert)
    assert torch.equal(expert_of_row, routing.expert_ids_TK.flatten().sort().values)
    y = dispatcher.combine(x_ND, ctx)
    torch.testing.assert_close(y, x * routing.weights_TK.sum(dim=1, keepdim=True))


def test_normalized_entropy_and_routing_stats():
    assert normalized_entropy(torch.tensor([0.25, 0.25, 0.25, 0.25])).item() == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([1.0, 0.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    # two of four equally: entropy log 2 over log 4
    assert normalized_entropy(torch.tensor([0.5, 0.5, 0.0, 0.0])).item() == pytest.approx(0.5)
    plain = MoELayer(16, 32, 4, 1)
    struct = MoELayer(16, 32, 4, 1, lore=LoREConfig(4, 2, 1))
    _, aux0 = plain(torch.randn(40, 16))
    _, aux1 = struct(torch.randn(40, 16))
    stats = routing_stats([aux0, aux1])
    assert set(stats) == {"moe/layer0/expert_load_entropy", "moe/layer0/expert_load", "moe/layer1/expert_load_entropy",
                          "moe/layer1/expert_load", "moe/layer1/lore_load", "moe/layer1/lore_load_entropy"}
    assert sum(stats["moe/layer0/expert_load"]) == pytest.approx(1.0, abs=1e-4)
    used = aux1.lore_load_EM.sum(dim=1) > 0
    expected = normalized_entropy(aux1.lore_load_EM[used]).mean().item()
    assert stats["moe/layer1/lore_load_entropy"] == pytest.approx(expected)
    assert 0.0 <= stats["moe/layer1/lore_load_entropy"] <= 1.0
