"""Expert parallelism: placement, the row regrouping, and the MoE layer on 2 gloo ranks against 1 rank; the
gradient reduction and global norm of the data-parallel wrapper (DDP and EP) against 1 rank; a router that sends
every token to one rank's expert, with token dropping (the rows it receives stay bounded) and without (warned).

Shape suffixes: T tokens, D hidden width."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from helpers.distributed import assert_grads_match_one_rank, run_on_ranks

from megatron.model.moe import Capacity, LoREConfig, MoELayer
from megatron.parallel import DistInfo
from megatron.parallel.data_parallel import ParallelModel
from megatron.parallel.expert_parallel import (
    ExpertParallel,
    all_gather_counts,
    experts_per_rank,
    local_expert_range,
    source_to_expert_major,
)
from megatron.parallel.mesh import build_parallel_dims
from megatron.training.lm_task import RoutingAccumulator
from megatron.training.routing_health import RoutingHealth


@pytest.mark.parametrize("experts, ranks, expected", [
    (8, 8, [1] * 8), (21, 8, [3, 3, 3, 3, 3, 2, 2, 2]), (18, 8, [3, 3, 2, 2, 2, 2, 2, 2]), (5, 2, [3, 2]),
    (4, 1, [4]),
])
def test_placement_is_balanced_and_contiguous(experts, ranks, expected):
    assert experts_per_rank(experts, ranks) == expected
    ranges = [local_expert_range(experts, ranks, r) for r in range(ranks)]
    assert [e for r in ranges for e in r] == list(range(experts))


def test_placement_needs_an_expert_per_rank():
    with pytest.raises(ValueError, match="moe_expert_parallel_size 4 > moe_num_experts 2: every EP rank"):
        experts_per_rank(2, 4)


def test_received_rows_are_regrouped_by_expert_then_source():
    counts_SL = torch.tensor([[2, 0, 1], [1, 3, 0]])  # source 0 sent 2 rows of expert 0, none of 1, 1 of 2
    labels = [(s, e) for s in range(2) for e in range(3) for _ in range(int(counts_SL[s, e]))]
    order = source_to_expert_major(counts_SL)
    assert [labels[i] for i in order] == sorted(labels, key=lambda se: (se[1], se[0]))
    assert source_to_expert_major(torch.zeros(2, 3, dtype=torch.long)).numel() == 0


def _gather_counts_with_and_without_the_new_name(rank: int, world_size: int) -> None:
    counts_E = torch.tensor([rank, 10 + rank, 20 + rank])
    expected = [[s, 10 + s, 20 + s] for s in range(world_size)]
    assert all_gather_counts(counts_E, None).tolist() == expected
    if hasattr(dist, "all_gather_single"):  # torch 2.13: now as on torch 2.11/2.12, which have only the old name
        del dist.all_gather_single
        assert all_gather_counts(counts_E, None).tolist() == expected


def test_counts_are_gathered_on_every_supported_torch():
    run_on_ranks(_gather_counts_with_and_without_the_new_name, 2)


LAYER_CASES = {
    "plain_top1": dict(num_experts=4, top_k=1),
    "plain_top2_uneven": dict(num_experts=5, top_k=2),
    "entangled_l1": dict(num_experts=4, top_k=1, lore=LoREConfig(4, 3, top_l=1)),
    "entangled_l2_top2_uneven": dict(num_experts=5, top_k=2, lore=LoREConfig(4, 3, top_l=2)),
    "router_free": dict(num_experts=4, top_k=1, lore=LoREConfig(4, 3, mode="router_free")),
    "standalone_top2": dict(num_experts=4, top_k=2, lore=LoREConfig(4, 3, mode="standalone")),
    "expert_without_rows": dict(num_experts=4, top_k=2, starve=[3]),
    "all_rows_to_rank0": dict(num_experts=4, top_k=2, starve=[2, 3], lore=LoREConfig(4, 3, top_l=2)),
    # gated experts and LoREs, and shared experts: replicated, so their gradients are summed over the ranks
    "swiglu_entangled_shared": dict(num_experts=5, top_k=2, activation="swiglu", num_shared_experts=2,
                                    lore=LoREConfig(4, 3, top_l=1)),
    "sinkhorn_geglu": dict(num_experts=4, top_k=1, activation="geglu", router_type="sinkhorn"),  # per-rank balance
    # token dropping: the capacity is per source rank, so each rank's outputs are the one-rank layer's on its batch
    "capacity_all_rows_to_rank0": dict(num_experts=4, top_k=2, starve=[2, 3], capacity=Capacity(0.75, 0.75, 0)),
    "capacity_probs_entangled_uneven": dict(num_experts=5, top_k=2, lore=LoREConfig(4, 3, top_l=1),
                                            capacity=Capacity(0.5, 0.5, 1, "probs")),
}


def _layers_and_input(case: dict, expert_parallel: ExpertParallel):
    case = dict(case)
    starve = case.pop("starve", [])
    layers = []
    for ep in (None, expert_parallel):
        torch.manual_seed(0)
        layer = MoELayer.build(hidden_size=16, ffn_hidden_size=24, **case, expert_parallel=ep)
        with torch.no_grad():
            layer.router.gate.weight[starve] = -1.0  # inputs are positive: these experts never win
        layers.append(layer)
    torch.manual_seed(1)
    x = torch.rand(2 * 12, 16) + 0.1
    return layers[0], layers[1], x


def _compare_layer(rank: int, world: int, name: str) -> None:
    torch.set_default_dtype(torch.float64)  # so that only a real difference, not rounding, can fail
    ep = ExpertParallel(world, rank, dist.group.WORLD)
    full, part, x = _layers_and_input(LAYER_CASES[name], ep)
    weights = torch.linspace(-1.0, 1.0, x.shape[0]).unsqueeze(1)
    mine = slice(rank * 12, (rank + 1) * 12)

    # one rank runs each rank's batch in turn; the objective includes the LoRE balancing loss, which is
    # defined per batch (with expert parallelism, its parts are computed where the experts are)
    halves = [slice(r * 12, (r + 1) * 12) for r in range(world)]
    outputs = [full(x[half]) for half in halves]
    sum(((y * weights[half]).sum() + aux.lore_balancing_loss for (y, aux), half in zip(outputs, halves))).backward()
    y_part, aux_part = part(x[mine])
    ((y_part * weights[mine]).sum() + aux_part.lore_balancing_loss).backward()
    torch.testing.assert_close(y_part, outputs[rank][0], atol=1e-10, rtol=1e-10)
    lore_loss = aux_part.lore_balancing_loss.detach().clone()
    dist.all_reduce(lore_loss)
    torch.testing.assert_close(lore_loss, sum(aux.lore_balancing_loss.detach() for _, aux in outputs))

    assert_grads_match_one_rank(full, part, name)


class _ProjectedMoE(nn.Module):
    """A replicated projection before an MoE layer: both kinds of parameter the wrapper reduces."""

    def __init__(self, expert_parallel: ExpertParallel | None):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 16)
        self.moe = MoELayer.build(hidden_size=16, ffn_hidden_size=24, num_experts=5, top_k=2,
                                  lore=LoREConfig(4, 3, top_l=1), expert_parallel=expert_parallel)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.moe(self.proj(x_TD))[0]


def _compare_wrapped_model(rank: int, world: int, ep_size: int) -> None:
    """ParallelModel's reduced gradients and global norm (clipping off, then on) == one rank's on the whole
    batch, whose loss is the mean of the ranks' losses. Catches a norm that counts a replicated element once
    per rank, and expert gradients not divided by the world size."""
    dims = build_parallel_dims(DistInfo(rank, world, 0, torch.device("cpu")), ep_size)
    full, part = _ProjectedMoE(None), _ProjectedMoE(dims.expert_parallel())
    wrapped = ParallelModel(part, dims)
    torch.manual_seed(1)
    x_TD = torch.rand(world * 12, 16) + 0.1
    weights_T1 = torch.linspace(-1.0, 1.0, x_TD.shape[0]).unsqueeze(1)
    halves = [slice(r * 12, (r + 1) * 12) for r in range(world)]
    (sum((full(x_TD[half]) * weights_T1[half]).sum() for half in halves) / world).backward()
    mine = halves[rank]
    (wrapped.module(x_TD[mine]) * weights_T1[mine]).sum().backward()
    wrapped.reduce_gradients()

    expected_norm = float(torch.nn.utils.get_total_norm([p.grad for p in full.parameters()]))
    norm = wrapped.clip_grad_norm_(0.0)  # 0: no clipping; the norm sums squares in fp32
    assert_reduced_grads_match(full, part)
    assert norm == pytest.approx(expected_norm, rel=1e-6), f"grad norm {norm}, one rank's {expected_norm}"
    max_norm = expected_norm / 3  # clips: every gradient shrinks by the same global factor
    torch.nn.utils.clip_grad_norm_(full.parameters(), max_norm)
    norm = wrapped.clip_grad_norm_(max_norm)
    assert norm == pytest.approx(expected_norm, rel=1e-6), f"grad norm {norm}, one rank's {expected_norm}"
    assert_reduced_grads_match(full, part)


def assert_reduced_grads_match(full: nn.Module, part: nn.Module) -> None:
    """Reduced gradients equal the one-rank model's (this rank's rows of the expert tensors)."""
    full_grads = {name: p.grad for name, p in full.named_parameters()}
    for name, param in part.named_parameters():
        expected = full_grads[name]
        if name.startswith(("moe.experts.", "moe.lore.")) and param.shape != expected.shape:
            rows = expected.shape[0] // part.moe.num_experts
            experts = part.moe.local_experts
            expected = expected[experts.start * rows:experts.stop * rows]
        torch.testing.assert_close(param.grad, expected, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def _compare_every_layer(rank: int, world: int) -> None:
    for name in LAYER_CASES:  # one pair of processes for all cases: starting them is most of a case's time
        try:
            _compare_layer(rank, world, name)
        except AssertionError as err:
            raise AssertionError(f"case {name}: {err}") from err
    for ep_size in (1, 2):  # DDP over every parameter; DDP + expert parallelism
        try:
            _compare_wrapped_model(rank, world, ep_size)
        except AssertionError as err:
            raise AssertionError(f"wrapped model, moe_expert_parallel_size {ep_size}: {err}") from err
    try:
        _every_token_to_expert_0(rank, world)
    except AssertionError as err:
        raise AssertionError(f"every token to expert 0: {err}") from err


def test_moe_layer_on_two_ranks_equals_one_rank():
    """The layer's outputs and gradients (dropless and with token dropping), and the wrapper's gradient reduction
    and norm, on 2 ranks; then a router that sends every token to one rank (`_every_token_to_expert_0`, here to
    share the processes, whose start is most of a case's time)."""
    run_on_ranks(_compare_every_layer, 2)


def _exchange_under_bf16_autocast(rank: int, world: int) -> None:
    ep = ExpertParallel(world, rank, dist.group.WORLD)
    full, part, x = _layers_and_input(dict(num_experts=4, top_k=2, lore=LoREConfig(4, 8, top_l=1)), ep)
    mine = slice(rank * 12, (rank + 1) * 12)
    x_mine = x[mine].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_full, _ = full(x[mine])
        y_part, aux = part(x_mine)
    y_part.sum().backward()
    assert x_mine.grad.dtype == torch.float32 and torch.isfinite(x_mine.grad).all()
    # the rows cross in bf16: 2 bytes an element, not fp32's 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = part.router(x[mine])
    crossing = int(sum(routing.tokens_per_expert_E[e] for e in range(4) if e not in part.local_experts))
    assert aux.dispatch_stats["exchange_bytes_sent"] == crossing * 16 * 2
    torch.testing.assert_close(y_part, y_full, rtol=2e-2, atol=2e-2)  # the same bf16 rows reach the experts


def test_rows_cross_the_exchange_in_the_autocast_dtype():
    run_on_ranks(_exchange_under_bf16_autocast, 2)


def _every_token_to_expert_0(rank: int, world: int) -> None:
    """A deliberately skewed router: every token of both ranks goes to expert 0, held by rank 0. With token
    dropping, rank 0 receives each source's capacity, within (sources x local experts x capacity); without, every
    row, and the routing health warns (once for the interval) that one rank received 2x the mean."""
    ep = ExpertParallel(world, rank, dist.group.WORLD)
    T = 12
    x = torch.rand(T, 16) + 0.1  # positive inputs: the +1 gate row always wins
    received = {}
    for capacity in (None, Capacity(1.0, 1.0, 0)):
        torch.manual_seed(0)
        layer = MoELayer.build(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=1, expert_parallel=ep,
                               capacity=capacity)
        with torch.no_grad():
            layer.router.gate.weight.copy_(torch.tensor([1.0, -1.0, -1.0, -1.0]).unsqueeze(1).expand(4, 16))
        rows = []
        layer.experts.register_forward_pre_hook(lambda module, args, rows=rows: rows.append(args[0].shape[0]))
        accumulator = RoutingAccumulator()
        for _ in range(3):  # a log interval of three steps
            y, aux = layer(x)
            y.sum().backward()
            accumulator.add([aux])
        received[capacity is not None] = rows[-1]
        assert aux.dispatch_stats["max_rank_rows_over_mean"] == 2.0  # rank 0 gets all rows: 2x the mean of 2 ranks

        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("megatron.routing").addHandler(handler)
        try:
            metrics = accumulator.pop()
            RoutingHealth(receive_factor=1.5).update(3, metrics)
            RoutingHealth(receive_factor=2.5).update(3, metrics)  # 2x is below this factor: quiet
        finally:
            logging.getLogger("megatron.routing").removeHandler(handler)
        crowded = [r for r in records if "expert-parallel rank" in r.getMessage()]  # not the collapse warning
        assert len(crowded) == 1 and crowded[0].levelno == logging.WARNING
        assert "MoE layer 0: an expert-parallel rank received 2.0 x the mean rows" in crowded[0].getMessage()
        assert metrics["moe/layer0/max_rank_rows_over_mean"] == 2.0

    # each rank's tokens to an expert of its own: every rank sends all its rows to one rank, yet receives its share
    layer = MoELayer.build(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=1, expert_parallel=ep)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([1.0, 0.0, -1.0, 0.0]).unsqueeze(1).expand(4, 16))
    _, aux_own = layer(x if rank == 0 else -x)  # positive inputs pick expert 0 (rank 0), negative expert 2 (rank 1)
    assert aux_own.dispatch_stats["max_rank_rows_over_mean"] == 1.0

    capacity = 3  # ceil(12 tokens x top-1 x 1.0 / 4 experts), from each source rank
    bound = world * len(ep.local_experts(4)) * capacity  # sources x local experts x capacity
    if rank == 0:
        assert received == {False: world * T, True: world * capacity} and received[True] <= bound
    else:
        assert received == {False: 0, True: 0}
    assert metrics["moe/layer0/dropped_fraction"] == pytest.approx(1 - capacity / T)
