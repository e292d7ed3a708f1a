"""Dropless experts over token rows already grouped by expert, with stacked weights; grouped matmuls.

Shape legend: N sorted rows, D hidden, F expert FFN width, E experts, G groups, K/M/O matmul dims.

Experts have no biases (as in Megablocks' dMoE and torchtitan): a per-expert bias adds little and
complicates the grouped kernels. The LoRE hook sits between the up-projection and the activation
(entangled) or after the down-projection (standalone LoREs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from megatron.model.moe.lore import LoREBank

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def normal_init_slice(shape: tuple[int, ...], std: float, rows: range | None = None) -> torch.Tensor:
    """N(0, std^2) draws for the full `shape`, keeping only `rows` of dim 0 (this rank's experts).

    Drawing the full tensor and slicing it makes every layout start from the weights one rank would
    have: the same random stream, consumed the same way, whatever the expert-parallel size.
    """
    full = torch.empty(shape)
    nn.init.normal_(full, std=std)
    return full if rows is None or len(rows) == shape[0] else full[rows.start:rows.stop].clone()


class _GroupedMM(torch.autograd.Function):
    """F.grouped_mm with a backward that accepts any incoming gradient.

    torch 2.13's own grouped_mm backward rejects a non-contiguous gradient (e.g. the stride-0 gradient
    of `y.sum()`) with "Invalid strides/sizes"; here it is made contiguous first. Being a Function of
    its own (not a view-returning wrapper) also lets the LoRE term be added into the output in place.
    """

    @staticmethod
    def forward(ctx, x_NK, w_GKM, offsets_G):
        ctx.save_for_backward(x_NK, w_GKM, offsets_G)
        return F.grouped_mm(x_NK, w_GKM, offs=offsets_G)

    @staticmethod
    def backward(ctx, grad_NM):
        x_NK, w_GKM, offsets_G = ctx.saved_tensors
        grad_NM = grad_NM.contiguous()
        grad_x = F.grouped_mm(grad_NM, w_GKM.transpose(-2, -1), offs=offsets_G) if ctx.needs_input_grad[0] else None
        grad_w = F.grouped_mm(x_NK.T, grad_NM, offs=offsets_G) if ctx.needs_input_grad[1] else None  # 0 if empty
        return grad_x, grad_w, None


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm wants fp32/bf16 and rows whose byte strides are multiples of 16."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16) or w.dtype != x.dtype:
        return False
    return all(size * x.element_size() % 16 == 0 for size in (x.shape[-1], w.shape[-1], w.shape[-2]))


def grouped_matmul(
    x_NK: torch.Tensor, w_GKM: torch.Tensor, rows_per_group_G: torch.Tensor, use_grouped_mm: bool | None = None
) -> torch.Tensor:
    """Row block g of x (rows_per_group_G[g] rows, in order) times w[g]: [N, M].

    use_grouped_mm: None picks grouped_mm where it supports the dtype/shape, False forces the loop.
    """
    if use_grouped_mm is None or use_grouped_mm:
        use_grouped_mm = grouped_mm_available(x_NK, w_GKM)
    if use_grouped_mm:
        offsets = torch.cumsum(rows_per_group_G, dim=0).to(torch.int32)  # cumulative ends
        return _GroupedMM.apply(x_NK, w_GKM, offsets)
    # unbind, not w[g]: indexing one group at a time would make backward build a full-size zero
    # gradient per group, which is quadratic in the number of groups.
    blocks = torch.split(x_NK, rows_per_group_G.tolist())
    return torch.cat([block @ w for block, w in zip(blocks, w_GKM.unbind(0))], dim=0)


class _AccumulateGroupedMatmul(torch.autograd.Function):
    """out[rows of g] += a[rows of g] @ w[g], in place, for many small groups.

    Made for the LoRE up-projection (a is [N, R], w is [G, R, F] with G = E*M groups of a few rows):
    that matmul is bound by reading w and writing its gradient, not by FLOPs. Adding straight into the
    expert's [N, F] output saves allocating, writing and re-reading an [N, F] term; backward writes each
    group's weight gradient once, with no per-group zero tensors or stacking.
    """

    @staticmethod
    def forward(ctx, out_NO, a_NK, w_GKO, rows_per_group: list[int]):
        start = 0
        for g, rows in enumerate(rows_per_group):
            if rows:
                out_NO[start:start + rows].addmm_(a_NK[start:start + rows], w_GKO[g])
            start += rows
        ctx.mark_dirty(out_NO)
        ctx.save_for_backward(a_NK, w_GKO)
        ctx.rows_per_group = rows_per_group
        return out_NO

    @staticmethod
    def backward(ctx, grad_NO):
        a_NK, w_GKO = ctx.saved_tensors
        grad_a = torch.empty_like(a_NK) if ctx.needs_input_grad[1] else None
        grad_w = torch.empty_like(w_GKO) if ctx.needs_input_grad[2] else None
        start = 0
        for g, rows in enumerate(ctx.rows_per_group):
            block = slice(start, start + rows)
            if grad_a is not None and rows:
                torch.mm(grad_NO[block], w_GKO[g].T, out=grad_a[block])
            if grad_w is not None:
                if rows:
                    torch.mm(a_NK[block].T, grad_NO[block], out=grad_w[g])
                else:
                    grad_w[g].zero_()
            start += rows
        return grad_NO, grad_a, grad_w, None


def accumulate_grouped_matmul(
    out_NO: torch.Tensor, a_NK: torch.Tensor, w_GKO: torch.Tensor, rows_per_group_G: torch.Tensor
) -> torch.Tensor:
    """`out + grouped_matmul(a, w)`, computed in place into `out` (which must not be needed elsewhere)."""
    return _AccumulateGroupedMatmul.apply(out_NO, a_NK, w_GKO, rows_per_group_G.tolist())


class GroupedExperts(nn.Module):
    """E two-layer MLPs, `act(x W_up[e]) W_down[e]`, over rows grouped by expert (dropless).

    With expert parallelism the module holds only `local_experts` (a range of the E global ids); its
    weights' leading dimension runs over those.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str = "gelu",
        init_std: float = 0.02,
        output_init_std: float = 0.02,
        use_grouped_mm: bool | None = None,
        local_experts: range | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.local_experts = range(num_experts) if local_experts is None else local_experts
        d, f = hidden_size, ffn_hidden_size
        self.w_up_EDF = nn.Parameter(normal_init_slice((num_experts, d, f), init_std, self.local_experts))
        self.w_down_EFD = nn.Parameter(normal_init_slice((num_experts, f, d), output_init_std, self.local_experts))
        self.act = ACTIVATIONS[activation]
        self.use_grouped_mm = use_grouped_mm  # None: grouped_mm where available, False: the loop

    def forward(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, lore: LoREBank | None = None
    ) -> tuple[torch.Tensor, dict | None]:
        """Rows of expert e are the tokens_per_expert_E[e] rows after those of experts < e."""
        up = lambda x: grouped_matmul(x, self.w_up_EDF, tokens_per_expert_E, self.use_grouped_mm)
        down = lambda h: grouped_matmul(h, self.w_down_EFD, tokens_per_expert_E, self.use_grouped_mm)
        if lore is None:
            return down(self.act(up(x_ND))), None
        return lore(x_ND, tokens_per_expert_E, up, self.act, down)  # a call, so FSDP2 gathers its weights
