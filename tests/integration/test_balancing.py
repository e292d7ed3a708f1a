"""Routing as trained today (moe/router.py, training/balancing.py): the loss-free bias, its update, global-batch and
sequence-level balancing losses and sigmoid scores, each against a hand computation or a per-token loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.reference import reference_moe

from megatron.model.moe import MoELayer
from megatron.model.moe.lore import LoREBank, LoREConfig, lore_aux
from megatron.model.moe.router import Balancing, TopKRouter, bias_step, load_balancing_loss
from megatron.training.balancing import BalanceTracker

BIAS = Balancing(bias=True, bias_update_rate=0.1)
GLOBAL = Balancing(lbl_scope="global_batch")


def identity_router(rows: list[list[float]], top_k: int = 1, **kwargs) -> tuple[TopKRouter, torch.Tensor]:
    """A router whose gate is the identity: token t's logits are rows[t]."""
    router = TopKRouter(len(rows[0]), len(rows[0]), top_k, **kwargs)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(len(rows[0])))
    return router, torch.tensor(rows)


def test_bias_update_on_a_hand_built_load_table():
    """b += rate * sign(mean - load): loads [5, 1, 2, 0] (mean 2) move the biases by -r, +r, 0, +r; for LoREs the
    mean is each expert's, and an expert that got no rows keeps its biases."""
    bias = torch.tensor([0.5, 0.0, -0.5, 0.0])
    assert bias_step(bias, torch.tensor([5, 1, 2, 0]), 0.1).tolist() == pytest.approx([0.4, 0.1, -0.5, 0.1])
    lore_bias = torch.zeros(2, 3)
    counts = torch.tensor([[6, 0, 3], [0, 0, 0]])  # expert 0: mean 3; expert 1: no rows
    torch.testing.assert_close(bias_step(lore_bias, counts, 0.01), torch.tensor([[-0.01, 0.01, 0.0], [0.0, 0.0, 0.0]]))


def test_the_bias_changes_the_choice_not_the_gate():
    router, x = identity_router([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.5]], balancing=BIAS)
    router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.3]))
    routing = router(x)
    probs = F.softmax(x, dim=-1)
    # token 2: probs [0.506, 0.186, 0.307]; +0.3 on expert 2 makes it 0.607 > 0.506: the bias moves it
    assert routing.expert_ids_TK.flatten().tolist() == [0, 1, 2]
    assert routing.weights_TK.flatten().tolist() == pytest.approx([probs[0, 0], probs[1, 1], probs[2, 2]])
    assert routing.balance_stats["bias_changed_fraction"].tolist() == [1, 3]  # [rows changed, rows]
    # the gates carry no bias, so the gradient is the unbiased softmax's
    routing.weights_TK.sum().backward()
    assert router.gate.weight.grad is not None


def test_training_moves_the_bias_towards_the_starved_expert():
    """Every token prefers expert 0; after each step the tracker lowers its bias and raises the others', until
    the bias overturns the preference."""
    torch.manual_seed(0)
    layer = MoELayer.build(8, 16, 2, 1, balancing=Balancing(bias=True, bias_update_rate=0.05))
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[0.1] * 8, [0.0] * 8]))
    tracker = BalanceTracker(layer)
    x = torch.ones(16, 8)  # logits [0.8, 0]: softmax 0.69 vs 0.31
    loads = []
    for _ in range(12):
        tracker.before_forward()
        _, aux = layer(x)
        tracker.record([aux])
        tracker.optimizer_stepped()
        loads.append(aux.balance.expert_slots_E.tolist())
    # the same in plain Python: probabilities [p, 1 - p], the bias's sign rule on the 16 tokens' loads
    p, bias, expected = 1 / (1 + math.exp(-0.8)), [0.0, 0.0], []
    for _ in range(12):
        load = [16, 0] if p + bias[0] >= 1 - p + bias[1] else [0, 16]
        expected.append(load)
        bias = [b + 0.05 * (1 if 8 > n else -1 if 8 < n else 0) for b, n in zip(bias, load)]
    assert loads == expected
    assert loads[:4] == [[16, 0]] * 4 and loads[4] == [0, 16]  # 4 steps of 0.1 overturn a 0.38 preference
    assert layer.router.expert_bias_E.tolist() == pytest.approx(bias)


def test_sigmoid_routing_matches_the_per_token_reference():
    """Scores sigmoid(x W); the top-k by score; gates the chosen scores divided by their sum."""
    torch.manual_seed(1)
    layer = MoELayer.build(16, 24, 6, 2, init_std=0.3, output_init_std=0.3, score_function="sigmoid")
    x = torch.randn(12, 16)
    scores = torch.sigmoid(x @ layer.router.gate.weight.T)
    chosen, ids = torch.topk(scores, 2, dim=-1)
    expected = reference_moe(layer, x, "gelu", (chosen / chosen.sum(dim=-1, keepdim=True), ids))
    y, aux = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    # the balancing loss's P is the scores normalised over experts
    probs = scores / scores.sum(dim=-1, keepdim=True)
    assert float(aux.load_balancing_loss) == pytest.approx(float(load_balancing_loss(probs, ids)), rel=1e-5)
    with pytest.raises(ValueError, match="sigmoid with moe_top_k 1"):
        MoELayer.build(16, 24, 6, 1, score_function="sigmoid")


def test_sequence_level_loss_is_the_mean_of_each_sequences_switch_loss():
    router, x = identity_router([[2.0, 0.0], [1.0, 0.0], [1.5, 0.0], [0.0, 0.5], [0.2, 0.0], [0.0, 3.0]],
                                balancing=Balancing(lbl_scope="sequence"))
    routing = router(x, num_sequences=2)
    probs = F.softmax(x, dim=-1)
    per_sequence = [load_balancing_loss(probs[s:s + 3], routing.expert_ids_TK[s:s + 3]) for s in (0, 3)]
    assert float(routing.load_balancing_loss) == pytest.approx(float(sum(per_sequence) / 2))
    assert float(routing.load_balancing_loss) != pytest.approx(float(load_balancing_loss(probs,
                                                                                           routing.expert_ids_TK)))


def test_global_batch_fractions_over_micro_batches_equal_one_big_batch():
    """Two micro-batches through the tracker: the second's loss uses f over both (the big batch's), its P over
    its own tokens; the first micro-batch's uses what has been seen so far (itself)."""
    rows = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.5, 0.0, 0.0], [0.0, 0.0, 1.0]]
    router, x = identity_router(rows, balancing=GLOBAL)
    layer = MoELayer.build(3, 4, 3, 1, balancing=GLOBAL)
    layer.router = router
    tracker = BalanceTracker(layer)
    big = router(x)
    probs = F.softmax(x, dim=-1)
    losses = []
    for half in (x[:3], x[3:]):
        tracker.before_forward()
        _, aux = layer(half)
        tracker.record([aux])
        losses.append(float(aux.load_balancing_loss))
    f_big = big.tokens_per_expert_E.float() / 6
    assert losses[1] == pytest.approx(float(3 * (f_big * probs[3:].mean(dim=0)).sum()))
    f_first = router(x[:3]).tokens_per_expert_E.float() / 3
    assert losses[0] == pytest.approx(float(3 * (f_first * probs[:3].mean(dim=0)).sum()))
    tracker.optimizer_stepped()
    assert router.counts_before_E.tolist() == [0, 0, 0]  # the next step starts afresh


def test_global_scope_is_the_micro_batch_scope_for_one_micro_batch_on_one_rank():
    torch.manual_seed(2)
    plain = MoELayer.build(8, 16, 4, 2, lore=LoREConfig(4, 2, top_l=2))
    torch.manual_seed(2)
    global_ = MoELayer.build(8, 16, 4, 2, balancing=GLOBAL, lore=LoREConfig(4, 2, top_l=2, balancing=GLOBAL))
    x = torch.randn(20, 8)
    _, a = plain(x)
    _, b = global_(x)
    assert float(b.load_balancing_loss) == pytest.approx(float(a.load_balancing_loss), rel=1e-6)
    assert float(b.lore_balancing_loss) == pytest.approx(float(a.lore_balancing_loss), rel=1e-6)


def test_global_lore_loss_uses_each_experts_shares_over_the_batch():
    """lore_aux with F given: M * sum_g sum_i F_ei (n_g P_gi) / N_s, against a loop over segments."""
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    ids = torch.tensor([[0], [1], [0], [1], [0]])
    rows_SE = torch.tensor([[2, 1], [1, 1]])  # source 0: 2 rows to expert 0, 1 to expert 1; source 1: 1 and 1
    total_S = torch.tensor([3, 2])
    fraction = torch.tensor([[0.25, 0.75], [0.6, 0.4]])
    got = lore_aux(probs, ids, rows_SE, total_S, torch.tensor([[2, 1], [1, 1]]), fraction)["lore_balancing_loss"]
    # rows in order: (e0, s0) rows 0-1, (e0, s1) row 2, (e1, s0) row 3, (e1, s1) row 4
    segments = [(0, 0, [0, 1]), (0, 1, [2]), (1, 0, [3]), (1, 1, [4])]
    expected = sum(2 * (fraction[e] * probs[r].sum(dim=0)).sum() / total_S[s] for e, s, r in segments)
    assert float(got) == pytest.approx(float(expected))


def test_lore_bias_changes_the_lore_choice_not_pi():
    torch.manual_seed(4)
    bank = LoREBank(2, 4, 2, 8, 16, balancing=BIAS)
    bank.lore_bias_EM.copy_(torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    x = torch.randn(6, 8)
    counts = torch.tensor([4, 2])
    plan = bank.plan(x, counts)
    logits = torch.cat([x[:4] @ bank.router.weight[:4].T, x[4:] @ bank.router.weight[4:].T])
    probs = F.softmax(logits, dim=-1)
    assert plan.aux["lore_slots_EM"].tolist() == [[0, 0, 0, 4], [2, 0, 0, 0]]  # a bias of 1 beats any softmax gap
    chosen = [3] * 4 + [0] * 2
    expected_pi = probs[torch.arange(6), chosen]
    torch.testing.assert_close(plan.pi_slots, expected_pi[plan.row_order_N])
    assert plan.aux["balance_stats"]["bias_changed_fraction"].tolist() == [
        int((probs.argmax(dim=-1) != torch.tensor(chosen)).sum()), 6]  # [rows changed, rows]


def test_sinkhorn_refuses_the_top_k_options():
    from megatron.model.moe.router import build_router

    with pytest.raises(ValueError, match="sinkhorn balances by itself"):
        build_router("sinkhorn", 8, 4, 1, balancing=BIAS)
    with pytest.raises(ValueError, match="lore_lbl_scope: sequence"):
        LoREBank(2, 4, 2, 8, 16, balancing=Balancing(lbl_scope="sequence"))


# -- in training: state kept exactly across resumes and layouts ------------------------------------------------
ALL_ON = {"moe_num_experts": 4, "moe_top_k": 2, "moe_router_score_function": "sigmoid",
          "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 0.05, "moe_lbl_scope": "global_batch",
          "lore_num_experts": 4, "lore_rank": 2, "lore_top_k": 1, "lore_loss_coeff": 0.01,
          "lore_router_enable_bias": True, "lore_router_bias_update_rate": 0.05, "lore_lbl_scope": "global_batch",
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "min_lr": 1e-4, "eval_interval": 0}
BUFFERS = ("expert_bias_E", "lore_bias_EM")


def saved_state(config) -> dict[str, torch.Tensor]:
    from helpers.layouts import final_parameters

    return final_parameters(config)


def test_balancing_state_resumes_exactly(tmp_path, data_prefix):
    """4 steps straight == 2 steps, exit, 2 more: losses, biases and parameters, with gradient accumulation (the
    global-batch loss's running counts) and every remedy on."""
    from helpers.runs import read_metrics, write_config

    import train

    run = {**ALL_ON, "train_iters": 4, "checkpoint_factor": 2, "gradient_accumulation_steps": 2}
    straight = write_config(tmp_path / "straight", data_prefix, **run)
    expected = train.run([str(straight)]).losses
    resumed = write_config(tmp_path / "resumed", data_prefix, **run)
    first = train.run([str(resumed), "--exit_interval", "2"]).losses
    assert first + train.run([str(resumed)]).losses == expected  # bit for bit
    got, want = saved_state(resumed), saved_state(straight)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert len([k for k in want if k.endswith(BUFFERS)]) == 4  # 2 layers x (experts, LoREs), saved
    # the biases moved and changed choices (a rate of 0.05 against sigmoid scores within 0.01 of each other
    # overshoots, so they swing from step to step: some end where they began)
    records = [r for r in read_metrics(tmp_path / "straight" / "logs") if "loss" in r]
    for layer in (0, 1):
        for kind in ("expert", "lore"):
            assert any(r[f"moe/layer{layer}/{kind}_bias_spread"] > 0 for r in records)
            assert any(r[f"moe/layer{layer}/{kind}_bias_changed_fraction"] > 0 for r in records)


def test_expert_parallel_with_balancing_equals_one_rank(tmp_path, data_prefix):
    """EP=2 on 2 ranks == 1 rank seeing both ranks' micro-batches at once (the same global batch, micro-batch by
    micro-batch): losses, the aux losses, the gradient norm, parameters and biases. The global-batch counts sum
    over ranks, the biases move by the global loads, and the LoRE biases are saved per expert (the 2-rank
    checkpoint loads into one rank)."""
    from helpers.distributed import torchrun
    from helpers.layouts import assert_same_parameters
    from helpers.runs import read_metrics, train_losses, write_config

    import train

    run = {**ALL_ON, "train_iters": 4, "checkpoint_factor": 100, "gradient_accumulation_steps": 2}
    one = write_config(tmp_path / "one", data_prefix, train_micro_batch_size_per_gpu=8, **run)
    two = write_config(tmp_path / "two", data_prefix, train_micro_batch_size_per_gpu=4, moe_expert_parallel_size=2,
                       **run)
    train.run([str(one)])
    torchrun(two, 2)
    single, parallel = (read_metrics(tmp_path / name / "logs") for name in ("one", "two"))
    assert train_losses(parallel) == pytest.approx(train_losses(single), abs=1e-5)
    for key in ("moe/load_balancing_loss", "moe/lore_balancing_loss", "grad_norm"):
        assert [r[key] for r in parallel] == pytest.approx([r[key] for r in single], rel=1e-4), key
    assert_same_parameters(saved_state(two), saved_state(one))


def test_a_recomputed_forward_sees_the_counts_the_first_one_saw(tmp_path, data_prefix):
    """Activation checkpointing runs each block's forward again in backward; the global-batch loss's running
    counts must not have moved in between, or the recomputed gradient differs from the one without recompute."""
    from helpers.runs import write_config

    import train

    run = {**ALL_ON, "train_iters": 2, "checkpoint_factor": 100, "gradient_accumulation_steps": 3}
    plain = write_config(tmp_path / "plain", data_prefix, **run)
    recompute = write_config(tmp_path / "recompute", data_prefix, checkpoint_activations=True, **run)
    assert train.run([str(recompute)]).losses == train.run([str(plain)]).losses
    got, want = saved_state(recompute), saved_state(plain)
    assert all(torch.equal(got[k], want[k]) for k in want)
