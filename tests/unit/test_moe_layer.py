"""The MoE layer against naive per-token references, over a table of shapes and activations (plain and
gated), with LoREs in every mode and shared experts."""

import math

import pytest
import torch
from helpers.reference import reference_moe

from megatron.model.moe import LocalDispatcher, LoREConfig, MoELayer
from megatron.model.moe.stats import normalized_entropy, routing_stats

# (tokens, hidden, ffn, experts, top_k)
SHAPES = [(1, 8, 16, 2, 1), (7, 16, 32, 4, 2), (33, 16, 48, 8, 1), (64, 32, 64, 8, 2), (5, 16, 32, 8, 1)]
ACTIVATIONS = ["gelu", "swiglu", "geglu"]
def check_against_reference(layer: MoELayer, T: int, D: int, activation: str = "gelu"):
    x = torch.randn(T, D, requires_grad=True)
    y, _ = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference_moe(layer, x_ref, activation)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(y)
    names, params = zip(*[("x", x), *layer.named_parameters()])
    grads = torch.autograd.grad(y, params, grad_out, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, (x_ref, *params[1:]), grad_out, allow_unused=True)
    for name, g, g_ref in zip(names, grads, grads_ref):
        if g is None or g_ref is None:  # a parameter the output does not use: on both sides, or a stray gradient
            assert g is None and g_ref is None, f"{name}: layer gradient {g is not None}, reference {g_ref is not None}"
            continue
        # fp32 rounding grows with the values (gated: products of two projections)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * max(1.0, float(g_ref.abs().max())),
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("T,D,Fd,E,K", SHAPES)
def test_dropless_moe_matches_per_token_reference(T, D, Fd, E, K, use_grouped_mm, activation):
    torch.manual_seed(T + E)
    layer = MoELayer.build(D, Fd, E, K, activation, init_std=0.3, output_init_std=0.3, use_grouped_mm=use_grouped_mm)
    check_against_reference(layer, T, D, activation)


LORE_CASES = [
    LoREConfig(4, 4, 1, "entangled"),
    LoREConfig(4, 4, 2, "entangled"),
    LoREConfig(3, 2, 2, "entangled", renormalize=True),
    LoREConfig(4, 4, 1, "router_free"),
    LoREConfig(4, 4, 1, "standalone"),
    LoREConfig(4, 4, 3, "standalone"),
]


# the 64-token shape (the slow reference) with the plain activation only
LORE_SHAPES = [(*shape, activation) for shape in SHAPES[1:4] for activation in ACTIVATIONS[:2]
               if activation == "gelu" or shape[0] < 64]


@pytest.mark.parametrize("lore", LORE_CASES, ids=lambda c: f"{c.mode}-M{c.num_lores}-r{c.rank}-l{c.top_l}")
@pytest.mark.parametrize("T,D,Fd,E,K,activation", LORE_SHAPES)
def test_lore_layer_matches_per_token_reference(T, D, Fd, E, K, lore, activation):
    """Gated: entangled and router-free LoREs add into both halves of the [N, 2F] up-projection (B is
    [R, 2F]), standalone ones after the down-projection as before."""
    torch.manual_seed(T)
    layer = MoELayer.build(D, Fd, E, K, activation, lore=lore, init_std=0.3, output_init_std=0.3)
    expected_B = D if lore.mode == "standalone" else (2 * Fd if activation != "gelu" else Fd)
    assert layer.lore.B.shape[-1] == expected_B
    with torch.no_grad():
        layer.lore.B.normal_(std=0.3)  # make the LoRE term as large as the expert's, to test it properly
    check_against_reference(layer, T, D, activation)


# (shared experts, activation, LoREs, use_grouped_mm)
SHARED_CASES = [(1, "gelu", None, None), (2, "swiglu", None, None), (2, "geglu", None, False),
                (1, "swiglu", LoREConfig(4, 4, 1, "entangled"), None),
                (3, "gelu", LoREConfig(4, 4, 2, "standalone"), None)]


@pytest.mark.parametrize("shared,activation,lore,use_grouped_mm", SHARED_CASES)
@pytest.mark.parametrize("T,D,Fd,E,K", SHAPES[1:3])
def test_shared_experts_add_a_dense_mlp_of_their_combined_width(T, D, Fd, E, K, shared, activation, lore,
                                                                 use_grouped_mm):
    torch.manual_seed(T + shared)
    layer = MoELayer.build(D, Fd, E, K, activation, lore=lore, init_std=0.3, output_init_std=0.3,
                           use_grouped_mm=use_grouped_mm, num_shared_experts=shared)
    up = (2 if activation != "gelu" else 1) * shared * Fd
    shared_mlp = layer.shared_experts
    assert shared_mlp.up.weight.shape == (up, D) and shared_mlp.down.weight.shape == (D, shared * Fd)
    assert layer.shared_experts not in layer.expert_parts()  # replicated under expert parallelism, like a dense MLP
    check_against_reference(layer, T, D, activation)


def test_layer_reports_loads_and_keeps_shape():
    layer = MoELayer.build(16, 32, 4, 2, lore=LoREConfig(4, 4, 1))
    y, aux = layer(torch.randn(3, 5, 16))
    assert y.shape == (3, 5, 16)
    assert int(aux.expert_slots_E.sum()) == 3 * 5 * 2  # every token's 2 slots
    assert aux.lore_slots_EM.shape == (4, 4) and torch.equal(aux.lore_slots_EM.sum(dim=1), aux.expert_slots_E)


def test_empty_experts_and_a_single_token():
    torch.manual_seed(0)
    layer = MoELayer.build(16, 32, 4, 1, lore=LoREConfig(4, 4, 1), init_std=0.3, output_init_std=0.3)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2, 0] = 5.0  # every token with x[0] > 0 goes to expert 2
    x = torch.randn(9, 16)
    x[:, 0] = x[:, 0].abs() + 1
    _, aux = layer(x)
    assert aux.expert_slots_E.tolist() == [0, 0, 9, 0]
    check_against_reference(layer, 9, 16)
    check_against_reference(layer, 1, 16)


def test_dispatch_then_combine_with_identity_experts_gives_the_gate_sum():
    torch.manual_seed(0)
    layer = MoELayer.build(8, 16, 4, 2)
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
    # from two layers' counts (summed over the global batch by the trainer): shares, and entropies of the shares;
    # the LoRE entropy is the mean over the experts that got rows (expert 2 got none)
    stats = routing_stats([torch.tensor([6, 2, 0, 0]), torch.tensor([4, 4, 4, 4])],
                          [None, torch.tensor([[2, 2], [4, 0], [0, 0], [1, 3]])])
    assert set(stats) == {"moe/layer0/expert_load_entropy", "moe/layer0/expert_load", "moe/layer1/expert_load_entropy",
                          "moe/layer1/expert_load", "moe/layer1/lore_load", "moe/layer1/lore_load_entropy"}
    assert stats["moe/layer0/expert_load"] == [0.75, 0.25, 0.0, 0.0]
    assert stats["moe/layer0/expert_load_entropy"] == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    assert stats["moe/layer1/expert_load_entropy"] == pytest.approx(1.0)
    assert stats["moe/layer1/lore_load"] == [[0.5, 0.5], [1.0, 0.0], [0.0, 0.0], [0.25, 0.75]]
    skewed = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert stats["moe/layer1/lore_load_entropy"] == pytest.approx((1.0 + 0.0 + skewed) / 3)
