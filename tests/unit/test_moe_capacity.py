"""Token dropping (moe/capacity.py): the capacity formula on hand-computed values, which slots each policy keeps,
the layer against a per-token reference that applies the same rule on its own (plain, gated, shared experts,
every LoRE mode), the eval factor in evaluation, LSH compression over the kept rows, the dropped fraction and
the peak statistics in the logged metrics, and GPT-NeoX's keys in the config.

Shape suffixes: T tokens, K slots per token, D hidden, E experts."""

from __future__ import annotations

import pytest
import torch
from helpers.reference import reference_capacity, reference_kept, reference_moe, reference_routing

from megatron.config import ConfigError, load_config
from megatron.model.build import build_gpt, moe_runtime_from_args
from megatron.model.moe import Capacity, LoREConfig, MoEAux, MoELayer
from megatron.model.moe.capacity import expert_capacity, keep_within_capacity
from megatron.model.moe.lsh import LSHConfig
from megatron.training.lm_task import RoutingAccumulator


# (tokens, top_k, experts, factor, min_capacity) -> capacity, worked out by hand
@pytest.mark.parametrize("T, K, E, factor, min_capacity, expected", [
    (16, 1, 4, 1.0, 0, 4),  # 16 / 4
    (10, 2, 4, 1.0, 0, 5),  # 20 slots / 4
    (10, 1, 4, 1.25, 0, 4),  # 12.5 / 4 = 3.125, up to 4
    (10, 1, 1, 1.1, 0, 11),  # 11 exactly: float noise (11.000000000000002) must not make it 12
    (6, 1, 8, 1.0, 4, 4),  # 0.75 -> 1, raised to the minimum
    (3, 2, 4, 0.5, 0, 1),  # 0.75 -> 1
    (4096, 2, 8, 1.25, 4, 1280),  # 8192 * 1.25 / 8
])
def test_capacity_formula_on_hand_computed_values(T, K, E, factor, min_capacity, expected):
    assert expert_capacity(T, K, E, factor, min_capacity) == expected
    assert reference_capacity(T, K, E, factor, min_capacity) == expected  # the tests' own formula agrees


def test_training_uses_the_train_factor_and_evaluation_the_eval_factor():
    capacity = Capacity(train_factor=1.0, eval_factor=2.0, min_capacity=0)
    assert capacity.per_expert(16, 1, 4, training=True) == 4
    assert capacity.per_expert(16, 1, 4, training=False) == 8


def test_a_bad_policy_or_factor_is_one_line():
    with pytest.raises(ValueError, match="moe_token_drop_policy: 'random' is not one of position, probs"):
        Capacity(policy="random")
    with pytest.raises(ValueError, match="must be > 0"):
        Capacity(train_factor=0.0)


def test_position_keeps_each_experts_first_slots_in_token_order():
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1], [2, 0]])  # token t's slots come before t + 1's
    gates_TK = torch.rand(5, 2)
    kept = keep_within_capacity(ids_TK, gates_TK, 3, capacity=2, policy="position")
    assert kept.slots_TK.tolist() == [[True, True], [True, True], [False, True], [False, False], [True, False]]
    assert kept.per_expert_E.tolist() == [2, 2, 2] and kept.count == 6 and kept.dropped_fraction == 0.4


def test_probs_keeps_each_experts_highest_gates_ties_in_token_order():
    ids_TK = torch.tensor([[0], [0], [1], [0], [0], [0]])
    gates_TK = torch.tensor([[0.1], [0.9], [0.5], [0.8], [0.2], [0.8]])
    kept = keep_within_capacity(ids_TK, gates_TK, 2, capacity=2, policy="probs")  # 0.9, then the earlier 0.8
    assert kept.slots_TK.flatten().tolist() == [False, True, True, True, False, False]
    kept = keep_within_capacity(ids_TK, gates_TK, 2, capacity=3, policy="probs")  # both 0.8s
    assert kept.slots_TK.flatten().tolist() == [False, True, True, True, False, True]
    kept = keep_within_capacity(torch.tensor([[0], [0], [0]]), torch.tensor([[0.5], [0.5], [0.5]]), 1, 2, "probs")
    assert kept.slots_TK.flatten().tolist() == [True, True, False]  # all tied: the first two, by position


# (tokens, hidden, ffn, experts, top_k, factor, min_capacity, policy, further layer settings)
LAYER_CASES = {
    "top1_position": (12, 8, 16, 4, 1, 0.5, 0, "position", {}),
    "top2_probs": (12, 8, 16, 4, 2, 0.5, 0, "probs", {}),
    "top2_position_loop": (10, 8, 16, 4, 2, 0.75, 1, "position", {"use_grouped_mm": False}),
    "swiglu_shared": (12, 8, 16, 4, 2, 0.5, 0, "position", {"activation": "swiglu", "num_shared_experts": 1}),
    "entangled_l1": (16, 8, 16, 4, 2, 0.75, 2, "position", {"lore": LoREConfig(4, 3, top_l=1)}),
    "entangled_l2_probs": (16, 8, 16, 4, 2, 0.75, 2, "probs", {"lore": LoREConfig(4, 3, top_l=2)}),
    "standalone": (16, 8, 16, 4, 1, 0.5, 0, "position", {"lore": LoREConfig(4, 3, mode="standalone")}),
    "router_free": (16, 8, 16, 4, 1, 0.5, 0, "position", {"lore": LoREConfig(4, 3, mode="router_free")}),
}


def rows_reaching_the_experts(layer: MoELayer) -> list[int]:
    """The row count of every call of the layer's experts (what their activation memory follows)."""
    rows: list[int] = []
    layer.experts.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_with_capacity_matches_a_per_token_reference(name):
    T, D, Fd, E, K, factor, min_capacity, policy, settings = LAYER_CASES[name]
    torch.manual_seed(len(name))
    settings = dict(settings)
    activation = settings.pop("activation", "gelu")
    layer = MoELayer.build(D, Fd, E, K, activation, init_std=0.5, output_init_std=0.3,
                           capacity=Capacity(factor, factor, min_capacity, policy), **settings)
    rows = rows_reaching_the_experts(layer)
    x = torch.randn(T, D, requires_grad=True)
    y, aux = layer(x)

    x_ref = x.detach().clone().requires_grad_(True)
    weights, ids = reference_routing(layer, x_ref)
    kept = reference_kept(weights, ids, E, reference_capacity(T, K, E, factor, min_capacity), policy)
    num_kept = sum(map(sum, kept))
    assert 0 < num_kept < T * K, "the case must drop some slots and keep others"
    y_ref = reference_moe(layer, x_ref, activation, kept=kept)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert rows == [num_kept]  # the dropped slots never reach the experts
    assert aux.dispatch_stats["dropped_fraction"] == pytest.approx(1 - num_kept / (T * K))

    grad_out = torch.randn_like(y)
    names, params = zip(*[("x", x), *layer.named_parameters()])
    grads = torch.autograd.grad(y, params, grad_out, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, (x_ref, *params[1:]), grad_out, allow_unused=True)
    for param_name, g, g_ref in zip(names, grads, grads_ref):
        if g is None or g_ref is None:
            assert g is None and g_ref is None, param_name
            continue
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * max(1.0, float(g_ref.abs().max())),
                                   msg=lambda m, n=param_name: f"{n}: {m}")


def test_a_token_whose_only_slot_is_dropped_passes_nothing_and_dropless_stays_the_default():
    torch.manual_seed(3)
    x = torch.randn(16, 8)
    dropless = MoELayer.build(8, 16, 4, 1, init_std=0.5)
    bounded = MoELayer.build(8, 16, 4, 1, init_std=0.5, capacity=Capacity(0.25, 0.25, 0))
    bounded.load_state_dict(dropless.state_dict())
    (y_free, aux_free), (y, aux) = dropless(x), bounded(x)
    dropped = (y == 0).all(dim=1)
    assert 0 < int(dropped.sum()) < 16 and "dropped_fraction" not in aux_free.dispatch_stats
    torch.testing.assert_close(y[~dropped], y_free[~dropped])  # the kept tokens are served exactly as dropless
    torch.testing.assert_close(aux.expert_slots_E, aux_free.expert_slots_E)  # the load is the router's choices


def test_evaluation_uses_the_eval_capacity_factor():
    T, D, E = 16, 8, 4
    torch.manual_seed(5)
    layer = MoELayer.build(D, 16, E, 1, init_std=0.5, capacity=Capacity(train_factor=2.0, eval_factor=0.5,
                                                                          min_capacity=0))
    x = torch.randn(T, D)
    weights, ids = reference_routing(layer, x)
    for training, factor in ((True, 2.0), (False, 0.5)):
        layer.train(training)
        with torch.no_grad():
            y, aux = layer(x)
        kept = reference_kept(weights, ids, E, reference_capacity(T, 1, E, factor, 0))
        torch.testing.assert_close(y, reference_moe(layer, x, kept=kept), rtol=1e-4, atol=1e-5)
        assert aux.dispatch_stats["dropped_fraction"] == pytest.approx(1 - sum(map(sum, kept)) / T)
    assert aux.dispatch_stats["dropped_fraction"] >= 0.5  # eval: 2 slots per expert for 16 tokens


def test_lsh_compresses_only_the_kept_rows():
    """LSH-MoE combines with token dropping: the capacity cut comes first, so the same slots are dropped and the
    centroids are made of kept rows only; without a collision the layer is the exact bounded layer."""
    torch.manual_seed(7)
    x = torch.randn(24, 16)
    capacity = Capacity(0.5, 0.5, 0)
    exact = MoELayer.build(16, 32, 4, 2, init_std=0.5, capacity=capacity)
    fine = MoELayer.build(16, 32, 4, 2, init_std=0.5, capacity=capacity, lsh=LSHConfig(num_hashes=2, hash_dim=16))
    coarse = MoELayer.build(16, 32, 4, 2, init_std=0.5, capacity=capacity, lsh=LSHConfig(num_hashes=1, hash_dim=1))
    for layer in (fine, coarse):
        layer.load_state_dict(exact.state_dict())
    rows = rows_reaching_the_experts(coarse)
    (y, aux), (y_fine, aux_fine), (_, aux_coarse) = exact(x), fine(x), coarse(x)
    assert aux_fine.dispatch_stats["lsh_compression_rate"] == 1.0
    torch.testing.assert_close(y_fine, y)
    dropped = aux.dispatch_stats["dropped_fraction"]
    assert dropped > 0 and aux_fine.dispatch_stats["dropped_fraction"] == aux_coarse.dispatch_stats[
        "dropped_fraction"] == dropped
    kept_rows = round(48 * (1 - dropped))
    assert rows[0] == round(kept_rows * aux_coarse.dispatch_stats["lsh_compression_rate"]) < kept_rows


def _aux(dispatch_stats: dict[str, float]) -> MoEAux:
    zero = torch.zeros(())
    return MoEAux(zero, zero, zero, torch.full((4,), 3), None, dispatch_stats)


def test_the_interval_logs_the_mean_dropped_fraction_and_the_peak_rank_rows():
    accumulator = RoutingAccumulator()
    for dropped, peak in ((0.1, 1.2), (0.3, 3.5), (0.2, 1.0)):
        accumulator.add([_aux({"dropped_fraction": dropped, "max_rank_rows_over_mean": peak})])
    metrics = accumulator.pop()
    assert metrics["moe/layer0/dropped_fraction"] == pytest.approx(0.2)
    assert metrics["moe/layer0/max_rank_rows_over_mean"] == 3.5  # the worst step, not the mean


# -- the config ------------------------------------------------------------------------------------

NEOX_MOE = "moe_num_experts: 4\nmoe_top_k: 2\nmoe_router_type: topk\n"


def test_neox_capacity_keys_are_honoured_and_reach_the_layers(tmp_path):
    path = tmp_path / "neox.yml"
    path.write_text(NEOX_MOE + "moe_token_dropping: true\nmoe_train_capacity_factor: 1.25\n"
                               "moe_eval_capacity_factor: 2.0\nmoe_min_capacity: 2\n")
    args = load_config([str(path)])
    assert not {"moe_token_dropping", "moe_train_capacity_factor", "moe_min_capacity"} & set(args.ignored_keys)
    expected = Capacity(train_factor=1.25, eval_factor=2.0, min_capacity=2, policy="position")
    assert moe_runtime_from_args(args).capacity == expected
    model = build_gpt(args, 256)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert layers and all(layer.capacity == expected for layer in layers)
    assert moe_runtime_from_args(load_config([], ["--moe_num_experts", "4"])).capacity is None  # dropless default


@pytest.mark.parametrize("overrides, message", [
    (["--moe_token_dropping", "true"], r"moe_token_dropping: True cannot act .*needs an MoE model"),
    (["--moe_num_experts", "4", "--moe_train_capacity_factor", "2.0"],
     r"moe_train_capacity_factor: 2\.0 cannot act .*needs moe_token_dropping: true"),
    (["--moe_num_experts", "4", "--moe_token_drop_policy", "probs"],
     r"moe_token_drop_policy: 'probs' cannot act .*needs moe_token_dropping: true"),
    (["--moe_num_experts", "4", "--moe_receive_warning_factor", "2"],
     r"moe_receive_warning_factor: 2\.0 cannot act .*needs expert parallelism"),
])
def test_capacity_keys_need_token_dropping_in_an_moe_model(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)
