"""StructMoE LoREs: Eq. 2 against the materialised Eq. 1, secondary routing by hand, shapes, counts, aux."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.model.moe import LoREBank, LoREConfig, MoELayer, moe_param_counts
from megatron.model.moe.lore import lore_aux


@pytest.mark.parametrize("top_l,renormalize,activation", [(1, False, "gelu"), (2, False, "gelu"), (3, True, "gelu"),
                                                           (1, False, "swiglu"), (2, True, "geglu")])
def test_entangled_output_equals_materialised_eq1(top_l, renormalize, activation):
    """What the layer computes (Eq. 2) equals x (W_up + sum_i pi_i A_i B_i) with the same pi (Eq. 1); gated,
    W_up and A B are [D, 2F], value columns then gate columns, and the expert is value * g(gate)."""
    torch.manual_seed(top_l)
    D, Fd, E, M, R, T = 16, 32, 2, 4, 4, 11
    layer = MoELayer.build(D, Fd, E, 1, activation, lore=LoREConfig(M, R, top_l, renormalize=renormalize), init_std=0.3,
                           output_init_std=0.3)
    with torch.no_grad():
        layer.lore.B.normal_(std=0.3)  # make the LoRE term as large as the expert's, to test it properly
    x = torch.randn(T, D)
    y, _ = layer(x)
    gate, e_ids = F.softmax(x @ layer.router.gate.weight.T, dim=-1).max(dim=-1)
    for t in range(T):
        e = int(e_ids[t])
        pi = F.softmax(x[t] @ layer.lore.router.weight[e * M:(e + 1) * M].T, dim=-1)
        top = torch.topk(pi, top_l)
        weights = top.values / top.values.sum() if renormalize else top.values
        w_eff = layer.experts.w_up_EDF[e] + sum(
            p * layer.lore.A[e, int(i)] @ layer.lore.B[e, int(i)] for p, i in zip(weights, top.indices)
        )
        h = x[t] @ w_eff
        act_h = F.gelu(h) if activation == "gelu" else h[:Fd] * {"swiglu": F.silu, "geglu": F.gelu}[activation](h[Fd:])
        expected = gate[t] * act_h @ layer.experts.w_down_EFD[e]
        torch.testing.assert_close(y[t], expected, rtol=1e-4, atol=1e-5)


def hand_built_bank(top_l: int, renormalize: bool = False) -> LoREBank:
    """2 experts, 3 LoREs each; for x = e_0 expert 0's LoRE logits are [2, 0, 1], expert 1's [0.5, 3, 0]."""
    bank = LoREBank(2, 3, 4, hidden_size=4, ffn_hidden_size=8, top_l=top_l, renormalize=renormalize)
    with torch.no_grad():
        bank.router.weight.zero_()
        bank.router.weight[0:3, 0] = torch.tensor([2.0, 0.0, 1.0])
        bank.router.weight[3:6, 0] = torch.tensor([0.5, 3.0, 0.0])
    return bank


def test_top_l_selection_and_pi_on_hand_built_router():
    bank = hand_built_bank(top_l=2)
    x = torch.zeros(2, 4)
    x[:, 0] = 1.0
    plan = bank.plan(x, torch.tensor([1, 1]))  # row 0 to expert 0, row 1 to expert 1
    z0, z1 = math.exp(2) + 1 + math.exp(1), math.exp(0.5) + math.exp(3) + 1
    # slots in (expert, LoRE) order: expert 0 takes LoREs 0 and 2, expert 1 LoREs 0 and 1
    assert plan.rows_per_group_G.tolist() == [1, 0, 1, 1, 1, 0]
    assert plan.pi_slots.tolist() == pytest.approx(
        [math.exp(2) / z0, math.exp(1) / z0, math.exp(0.5) / z1, math.exp(3) / z1])
    assert plan.slot_rows.tolist() == [0, 0, 1, 1]
    assert plan.aux["lore_load_EM"].tolist() == [[0.5, 0.0, 0.5], [0.5, 0.5, 0.0]]


def test_top_1_regroups_rows_and_keeps_raw_pi():
    bank = hand_built_bank(top_l=1)
    x = torch.zeros(3, 4)
    x[:, 0] = torch.tensor([1.0, -1.0, 1.0])  # expert 0 rows: logits [2,0,1] and [-2,0,-1]; expert 1: [0.5,3,0]
    plan = bank.plan(x, torch.tensor([2, 1]))
    z0, z1 = math.exp(2) + 1 + math.exp(1), math.exp(-2) + 1 + math.exp(-1)
    assert plan.rows_per_group_G.tolist() == [1, 1, 0, 0, 1, 0]
    assert plan.row_order_N.tolist() == [0, 1, 2]
    z2 = math.exp(0.5) + math.exp(3) + 1
    assert plan.pi_slots.tolist() == pytest.approx([math.exp(2) / z0, 1 / z1, math.exp(3) / z2])
    renormalized = hand_built_bank(top_l=1, renormalize=True).plan(x, torch.tensor([2, 1]))
    assert renormalized.pi_slots.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_lore_balancing_loss_and_load_on_a_hand_computed_case():
    # expert 0: 3 rows, all choose LoRE 0; expert 1: 1 row choosing LoRE 1
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    lore_ids = torch.tensor([[0], [0], [0], [1]])
    slots_EM = torch.tensor([[3, 0], [0, 1]])
    aux = lore_aux(probs, lore_ids, torch.tensor([[3, 1]]), torch.tensor([4]), slots_EM)
    # expert 0: f = [1, 0], P = [2.2/3, 0.8/3]: 2 * 2.2/3; expert 1: f = [0, 1], P = [0.2, 0.8]: 1.6
    # weighted by rows: (3 * 4.4/3 + 1 * 1.6) / 4 = 1.5
    assert aux["lore_balancing_loss"].item() == pytest.approx(1.5)
    assert aux["lore_load_EM"].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_lore_balancing_loss_is_the_sum_of_the_source_batches_losses():
    """The same rows from two batches (as expert parallelism delivers them: by expert, then source).
    Batch 0 (2 rows): rows 0 and 1, expert 0, LoRE 0: f = [1, 0], P = [0.75, 0.25]: (2 * 1.5) / 2 = 1.5.
    Batch 1 (2 rows): row 2 to expert 0 (LoRE 0, P = [0.7, 0.3]: 1.4), row 3 to expert 1 (LoRE 1, 1.6):
    (1.4 + 1.6) / 2 = 1.5. In all 3.0, where one batch of the 4 rows gives 1.5."""
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    lore_ids = torch.tensor([[0], [0], [0], [1]])
    rows_SE = torch.tensor([[2, 0], [1, 1]])  # expert 0: 2 rows from batch 0, then 1 from batch 1
    aux = lore_aux(probs, lore_ids, rows_SE, torch.tensor([2, 2]), torch.tensor([[3, 0], [0, 1]]))
    assert aux["lore_balancing_loss"].item() == pytest.approx(3.0)


def test_gradients_reach_lores_and_both_routers():
    torch.manual_seed(0)
    layer = MoELayer.build(16, 32, 4, 2, lore=LoREConfig(4, 4, 1))
    y, aux = layer(torch.randn(20, 16))
    (y.square().mean() + aux.load_balancing_loss + aux.z_loss).backward()
    for name in ("lore.A", "lore.B", "lore.router.weight", "router.gate.weight", "experts.w_up_EDF"):
        grad = layer.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_init_keeps_the_term_small_but_not_zero():
    torch.manual_seed(0)
    bank = LoREBank(2, 8, 4, 64, 128, init_std=0.02)
    assert 0 < bank.B.std().item() < 0.2 * bank.A.std().item()


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("mode", ["entangled", "router_free", "standalone"])
def test_lore_shapes_and_parameter_counts(mode, activation, shared):
    """Gated: the experts' up-projection is [D, 2F] and an entangled (or router-free) LoRE's B is [R, 2F]."""
    D, Fd, E, M, R = 16, 48, 4, 8, 4
    lore = LoREConfig(M, R, 1, mode)
    layer = MoELayer.build(D, Fd, E, 1, activation, lore=lore, num_shared_experts=shared)
    U = 2 * Fd if activation == "swiglu" else Fd
    expected_shapes = {
        "entangled": ((E, M, D, R), (E, M, R, U)),
        "router_free": ((E, 1, D, M * R), (E, 1, M * R, U)),
        "standalone": ((E, M, D, R), (E, M, R, D)),
    }[mode]
    assert (tuple(layer.lore.A.shape), tuple(layer.lore.B.shape)) == expected_shapes
    assert tuple(layer.experts.w_up_EDF.shape) == (E, D, U) and tuple(layer.experts.w_down_EFD.shape) == (E, Fd, D)
    lore_params = {"entangled": E * M * R * (D + U), "router_free": E * M * R * (D + U),
                   "standalone": E * M * R * 2 * D}[mode]
    lore_router = 0 if mode == "router_free" else D * E * M
    counts = moe_param_counts(D, Fd, E, lore, gated=activation == "swiglu", shared=shared)
    assert counts == {"experts": E * D * (U + Fd), "lores": lore_params, "routers": D * E + lore_router,
                      "shared": shared * D * (U + Fd)}
    assert sum(p.numel() for p in layer.parameters()) == sum(counts.values())
    assert (mode == "router_free") == (not hasattr(layer.lore, "router"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="tangled"), "lore_mode: 'tangled' is not one of"),
    (dict(top_l=5), "lore_top_k 5 must be between 1 and lore_num_experts 4"),
    (dict(rank=0), "lore_rank 0 must be >= 1"),
])
def test_bad_lore_settings_are_clear_errors(kwargs, message):
    settings = dict(num_lores=4, rank=2, top_l=1, mode="entangled") | kwargs
    with pytest.raises(ValueError, match=message):
        LoREConfig(**settings)
