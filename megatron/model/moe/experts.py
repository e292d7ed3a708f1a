"""Dropless experts over token rows already grouped by expert, with stacked weights.

Shape legend: N sorted rows, D hidden, F expert FFN width, E experts, G groups.

Experts have no biases (as in Megablocks' dMoE and torchtitan): a per-expert bias adds little and
complicates the grouped kernels. The LoRE hook sits between the up-projection and the activation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from megatron.model.moe.lore import LoREBank

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch 2.13's grouped_mm backward rejects a non-contiguous gradient (e.g. the stride-0 gradient of
    `y.sum()`) with "Invalid strides/sizes".
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm wants fp32/bf16 and rows whose byte strides are multiples of 16."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16) or w.dtype != x.dtype:
        return False
    return all(size * x.element_size() % 16 == 0 for size in (x.shape[-1], w.shape[-1], w.shape[-2]))


def grouped_matmul(
    x_NK: torch.Tensor, w_GKM: torch.Tensor, rows_per_group_G: torch.Tensor, use_grouped_mm: bool | None = None
) -> torch.Tensor:
    """Row block g of x (rows_per_group_G[g] rows, in order) times w[g]."""
    if use_grouped_mm is None or use_grouped_mm:
        use_grouped_mm = grouped_mm_available(x_NK, w_GKM)
    if use_grouped_mm:
        offsets = torch.cumsum(rows_per_group_G, dim=0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x_NK, w_GKM, offs=offsets))
    # unbind, not w[g]: indexing one group at a time would make backward build a full-size zero
    # gradient per group, which is quadratic in the number of groups.
    blocks = torch.split(x_NK, rows_per_group_G.tolist())
    return torch.cat([block @ w for block, w in zip(blocks, w_GKM.unbind(0))], dim=0)


class GroupedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str = "gelu",
        init_std: float = 0.02,
        output_init_std: float = 0.02,
        use_grouped_mm: bool | None = None,
    ):
        super().__init__()
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        nn.init.normal_(self.w_up_EDF, std=init_std)
        nn.init.normal_(self.w_down_EFD, std=output_init_std)
        self.act = ACTIVATIONS[activation]
        self.use_grouped_mm = use_grouped_mm  # None: grouped_mm where available, else a loop

    def forward(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, lore: LoREBank | None = None
    ) -> tuple[torch.Tensor, dict | None]:
        if lore is None:
            h_NF = grouped_matmul(x_ND, self.w_up_EDF, tokens_per_expert_E, self.use_grouped_mm)
            return grouped_matmul(self.act(h_NF), self.w_down_EFD, tokens_per_expert_E, self.use_grouped_mm), None

        plan = lore.plan(x_ND, tokens_per_expert_E)
        if plan.row_order_N is not None:  # rows regrouped by (expert, LoRE); still expert-major
            x_ND = x_ND.index_select(0, plan.row_order_N)
        h_NF = grouped_matmul(x_ND, self.w_up_EDF, tokens_per_expert_E, self.use_grouped_mm)
        if lore.entangled:
            h_NF = h_NF + lore.delta(x_ND, plan)  # H = x W_up + sum_i pi_i (x A_i) B_i, before the activation
        y_ND = grouped_matmul(self.act(h_NF), self.w_down_EFD, tokens_per_expert_E, self.use_grouped_mm)
        if not lore.entangled:
            y_ND = y_ND + lore.delta(x_ND, plan)  # standalone low-rank experts add to the output
        if plan.row_order_N is not None:
            y_ND = torch.empty_like(y_ND).index_copy(0, plan.row_order_N, y_ND)
        return y_ND, plan.aux
