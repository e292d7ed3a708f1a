"""Dropless experts over token rows already grouped by expert, with stacked weights.

Shape legend: N sorted rows, T tokens, D hidden, F expert FFN width (what the down-projection sees), U the
up-projection's width (F, or 2F for a gated activation: value then gate), E experts.

The grouped matmuls they run on (torch's grouped_mm, grouped_gemm's gmm, or a per-group loop) are in
kernels.py, and so is the choice between them for the run's device.

Experts have no biases by default (as in Megablocks' dMoE, GPT-NeoX and torchtitan, whatever use_bias_in_mlp
says); `bias=True` (moe_use_bias_in_experts, gpt-oss) gives each expert a bias on both projections, added to the
grouped matmuls' rows by the row's expert (`with_bias`), so every kernel path keeps its bias-free matmul. The LoRE
hook sits between the up-projection (bias included) and the activation (entangled) or after the down-projection
(standalone LoREs). Shared experts (DeepSeekMoE) are one dense MLP beside the routed ones, which every token
goes through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from megatron.model.activations import Activation, as_activation, up_width
from megatron.model.moe.init import normal_init_slice
from megatron.model.moe.kernels import compute_dtype, gmm_available, grouped_matmul

if TYPE_CHECKING:
    from megatron.model.moe.dispatcher import RowSources
    from megatron.model.moe.lore import LoREBank


def expert_of_rows(tokens_per_expert_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The (local) expert of each of `num_rows` rows grouped by expert: long [N], no host sync."""
    experts_E = torch.arange(tokens_per_expert_E.numel(), device=tokens_per_expert_E.device)
    return torch.repeat_interleave(experts_E, tokens_per_expert_E, output_size=num_rows)


def with_bias(h_NX: torch.Tensor, bias_EX: torch.Tensor | None, expert_of_row_N: torch.Tensor | None
              ) -> torch.Tensor:
    """Each row plus its expert's bias, in the rows' dtype (an autocast matmul's); unchanged without a bias."""
    if bias_EX is None:
        return h_NX
    return h_NX + bias_EX.to(h_NX.dtype).index_select(0, expert_of_row_N)


class GroupedExperts(nn.Module):
    """E two-layer MLPs, `act(x W_up[e]) W_down[e]`, over rows grouped by expert (dropless).

    `w_up_EDF` is [E, D, U]: U = F, or 2F for a gated activation (columns [:F] the value, [F:] the gate, as
    activations.py reads them); it keeps its name (and checkpoint key) either way. With `bias`, `b_up_EU` [E, U]
    (the same column order) and `b_down_ED` [E, D], zero at init.

    With expert parallelism the module holds only `local_experts` (a range of the E global ids); its
    weights' leading dimension runs over those.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str | Activation = "gelu",
        init_std: float = 0.02,
        output_init_std: float = 0.02,
        use_grouped_mm: bool | None = None,
        local_experts: range | None = None,
        gmm: Callable | None = None,
        bias: bool = False,
    ):
        """gmm: grouped_gemm's kernel (`moe_impl: grouped_gemm`), used for bf16 CUDA rows; None: torch's."""
        super().__init__()
        self.local_experts = range(num_experts) if local_experts is None else local_experts
        d, f, u = hidden_size, ffn_hidden_size, up_width(activation, ffn_hidden_size)  # unknown names fail here
        self.w_up_EDF = nn.Parameter(normal_init_slice((num_experts, d, u), init_std, self.local_experts))
        self.w_down_EFD = nn.Parameter(normal_init_slice((num_experts, f, d), output_init_std, self.local_experts))
        held = len(self.local_experts)  # zeros draw nothing: every layout starts from the same weights
        self.b_up_EU = nn.Parameter(torch.zeros(held, u)) if bias else None
        self.b_down_ED = nn.Parameter(torch.zeros(held, d)) if bias else None
        self.act = as_activation(activation)
        self.use_grouped_mm = use_grouped_mm  # None: grouped_mm where available, False: the loop
        self.gmm = gmm

    def forward(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, lore: LoREBank | None = None,
        sources: RowSources | None = None,
    ) -> tuple[torch.Tensor, dict | None]:
        """Rows of expert e are the tokens_per_expert_E[e] rows after those of experts < e; `sources`
        says whose batch they came from (for the LoRE balancing loss; None: all from this rank's)."""
        sizes = None
        on_gmm = self.gmm is not None and self.use_grouped_mm is not False
        if on_gmm and gmm_available(x_ND, self.w_up_EDF, compute_dtype(x_ND)):
            sizes = tokens_per_expert_E.cpu()  # host sync: gmm's group sizes, once for both projections
        # the LoREs may reorder rows, but within each expert's block: a row's expert is the same either way
        expert_N = None if self.b_up_EU is None else expert_of_rows(tokens_per_expert_E, x_ND.shape[0])
        up = lambda x: with_bias(grouped_matmul(x, self.w_up_EDF, tokens_per_expert_E, self.use_grouped_mm, self.gmm,
                                                sizes), self.b_up_EU, expert_N)
        down = lambda h: with_bias(grouped_matmul(h, self.w_down_EFD, tokens_per_expert_E, self.use_grouped_mm,
                                                  self.gmm, sizes), self.b_down_ED, expert_N)
        if lore is None:
            return down(self.act(up(x_ND))), None
        return lore(x_ND, tokens_per_expert_E, up, self.act, down, sources)  # a call: FSDP2 gathers its weights


class SharedExperts(nn.Module):
    """DeepSeekMoE's shared experts: `num_shared` always-on experts as one MLP `num_shared` times an expert's
    width (DeepSeek's n_shared_experts x moe_intermediate_size), with the experts' activation, and biases when the
    experts have them; the layer adds its output to the routed output.

    Not an expert part: with expert parallelism every rank holds it whole, like a dense MLP, and
    DDP/FSDP reduce and shard it with the non-expert parameters. Built of nn.Linear, so the FLOPs walk
    counts it as dense.
    """

    def __init__(self, num_shared: int, hidden_size: int, ffn_hidden_size: int, activation: str | Activation = "gelu",
                 init_std: float = 0.02, output_init_std: float = 0.02, bias: bool = False):
        super().__init__()
        width = num_shared * ffn_hidden_size
        self.up = nn.Linear(hidden_size, up_width(activation, width), bias=bias)
        self.down = nn.Linear(width, hidden_size, bias=bias)
        nn.init.normal_(self.up.weight, std=init_std)
        nn.init.normal_(self.down.weight, std=output_init_std)
        for linear in (self.up, self.down) if bias else ():
            nn.init.zeros_(linear.bias)
        self.act = as_activation(activation)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x_TD)))
