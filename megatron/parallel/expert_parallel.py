"""Expert parallelism: which rank holds which experts, and the differentiable all-to-all that moves rows.

Shape legend: N rows, D hidden, E experts (global), L experts on this rank, S source ranks (= EP size).

Placement is balanced and contiguous: with E experts over P ranks, the first E mod P ranks hold
ceil(E/P) experts and the others floor(E/P). So a parameter-matched baseline with 21 or 18 experts runs
on EP = 8 as it is (3 or 2 experts a rank), instead of forcing the expert count to a multiple of EP
and so breaking the parameter match. The all-to-all takes uneven splits anyway, so nothing else cares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def check_ep_layout(ep_size: int, num_experts: int | None = None, world_size: int | None = None,
                    ep_name: str = "moe_expert_parallel_size", world_name: str = "the number of ranks") -> None:
    """The one rule for an expert-parallel layout, as a one-line ValueError: EP needs an MoE model, every EP rank
    holds at least one expert, and EP groups tile the world. A caller leaves out (None) what it does not know, and
    names the EP size and world size as its user gave them (a config key, a flag)."""
    if ep_size < 1:
        raise ValueError(f"{ep_name} {ep_size} must be >= 1")
    if num_experts is not None:
        if ep_size > 1 and num_experts <= 1:
            raise ValueError(f"{ep_name} {ep_size} needs an MoE model (moe_num_experts > 1)")
        if ep_size > max(num_experts, 1):
            raise ValueError(f"{ep_name} {ep_size} > moe_num_experts {num_experts}: "
                             "every EP rank must hold at least one expert")
    if world_size is not None and world_size % ep_size:
        raise ValueError(f"{ep_name} {ep_size} must divide {world_name} {world_size}")


def experts_per_rank(num_experts: int, ep_size: int) -> list[int]:
    """Experts held by each EP rank: ceil(E/P) for the first E mod P ranks, floor(E/P) for the rest."""
    check_ep_layout(ep_size, num_experts)
    base, extra = divmod(num_experts, ep_size)
    return [base + (1 if p < extra else 0) for p in range(ep_size)]


def local_expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    counts = experts_per_rank(num_experts, ep_size)
    start = sum(counts[:ep_rank])
    return range(start, start + counts[ep_rank])


@dataclass(frozen=True)
class ExpertParallel:
    """What an MoE layer needs to split its experts: this rank's place in its EP group, and the group."""

    size: int
    rank: int
    group: dist.ProcessGroup | None  # None with size 1

    def local_experts(self, num_experts: int) -> range:
        return local_expert_range(num_experts, self.size, self.rank)


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits; its backward is the reverse exchange of the gradients."""

    @staticmethod
    def forward(ctx, x_ND, output_splits: list[int], input_splits: list[int], group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return exchange_rows(x_ND, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_ND):
        output_splits, input_splits = ctx.splits
        return exchange_rows(grad_ND, input_splits, output_splits, ctx.group), None, None, None


def exchange_rows(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """One `all_to_all_single` of rows with uneven splits, not differentiable (`all_to_all` is)."""
    out = x_ND.new_empty((sum(output_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(out, x_ND.contiguous(), output_splits, input_splits, group=group)
    return out


def all_to_all(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Send input_splits[p] rows to rank p of `group`, receive output_splits[p] rows from it; differentiable."""
    return _AllToAll.apply(x_ND, output_splits, input_splits, group)


def all_gather_counts(counts_E: torch.Tensor, group) -> torch.Tensor:
    """Every rank's per-expert row counts: [S, E]. A small collective that precedes the row exchange."""
    size = dist.get_world_size(group)
    gathered = counts_E.new_empty(size * counts_E.numel())  # gloo wants a flat output
    all_gather_flat(gathered, counts_E.contiguous(), group)
    return gathered.view(size, -1)


def all_gather_flat(output: torch.Tensor, input: torch.Tensor, group) -> None:
    """Every rank's `input` concatenated into `output`, on whichever name this torch has: torch 2.13 added
    `all_gather_single` and deprecated `all_gather_into_tensor`, the only one torch 2.11 and 2.12 have."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def source_to_expert_major(counts_SL: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Row order that turns received rows (blocks by source, then expert) into blocks by expert, then source.

    counts_SL[s, l] rows came from source s for local expert l; the result indexes the received rows.
    `total` (the number of rows, if the caller has it on the host) saves a device-to-host sync.
    """
    flat = counts_SL.flatten()
    starts_SL = (torch.cumsum(flat, 0) - flat).view_as(counts_SL)
    counts_LS, starts_LS = counts_SL.T.flatten(), starts_SL.T.flatten()
    total = int(flat.sum()) if total is None else total
    block_start = torch.repeat_interleave(starts_LS, counts_LS, output_size=total)
    position_in_block = torch.arange(total, device=counts_SL.device) - torch.repeat_interleave(
        torch.cumsum(counts_LS, 0) - counts_LS, counts_LS, output_size=total
    )
    return block_start + position_in_block
