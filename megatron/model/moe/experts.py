"""Dropless experts over token rows already grouped by expert, with stacked weights.

Shape legend: N sorted rows, T tokens, D hidden, F expert FFN width (what the down-projection sees), U the
up-projection's width (F, or 2F for a gated activation: value then gate), E experts.

The grouped matmuls they run on (torch's grouped_mm, grouped_gemm's gmm, or a per-group loop) are in
kernels.py, and so is the choice between them for the run's device.

Experts have no biases (as in Megablocks' dMoE and torchtitan): a per-expert bias adds little and
complicates the grouped kernels. The LoRE hook sits between the up-projection and the activation
(entangled) or after the down-projection (standalone LoREs). Shared experts (DeepSeekMoE) are one dense MLP
beside the routed ones, which every token goes through.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from megatron.model.activations import activate, up_width
from megatron.model.moe.init import normal_init_slice
from megatron.model.moe.kernels import compute_dtype, gmm_available, grouped_matmul

if TYPE_CHECKING:
    from megatron.model.moe.dispatcher import RowSources
    from megatron.model.moe.lore import LoREBank


class GroupedExperts(nn.Module):
    """E two-layer MLPs, `act(x W_up[e]) W_down[e]`, over rows grouped by expert (dropless).

    `w_up_EDF` is [E, D, U]: U = F, or 2F for a gated activation (columns [:F] the value, [F:] the gate, as
    activations.py reads them); it keeps its name (and checkpoint key) either way.

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
        gmm: Callable | None = None,
    ):
        """gmm: grouped_gemm's kernel (`moe_impl: grouped_gemm`), used for bf16 CUDA rows; None: torch's."""
        super().__init__()
        self.local_experts = range(num_experts) if local_experts is None else local_experts
        d, f, u = hidden_size, ffn_hidden_size, up_width(activation, ffn_hidden_size)  # unknown names fail here
        self.w_up_EDF = nn.Parameter(normal_init_slice((num_experts, d, u), init_std, self.local_experts))
        self.w_down_EFD = nn.Parameter(normal_init_slice((num_experts, f, d), output_init_std, self.local_experts))
        self.act = partial(activate, activation)
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
        up = lambda x: grouped_matmul(x, self.w_up_EDF, tokens_per_expert_E, self.use_grouped_mm, self.gmm, sizes)
        down = lambda h: grouped_matmul(h, self.w_down_EFD, tokens_per_expert_E, self.use_grouped_mm, self.gmm, sizes)
        if lore is None:
            return down(self.act(up(x_ND))), None
        return lore(x_ND, tokens_per_expert_E, up, self.act, down, sources)  # a call: FSDP2 gathers its weights


class SharedExperts(nn.Module):
    """DeepSeekMoE's shared experts: `num_shared` always-on experts as one MLP `num_shared` times an expert's
    width, with the experts' activation and no biases; the layer adds its output to the routed output.

    Not an expert part: with expert parallelism every rank holds it whole, like a dense MLP, and
    DDP/FSDP reduce and shard it with the non-expert parameters. Built of nn.Linear, so the FLOPs walk
    counts it as dense.
    """

    def __init__(self, num_shared: int, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu",
                 init_std: float = 0.02, output_init_std: float = 0.02):
        super().__init__()
        width = num_shared * ffn_hidden_size
        self.up = nn.Linear(hidden_size, up_width(activation, width), bias=False)
        self.down = nn.Linear(width, hidden_size, bias=False)
        nn.init.normal_(self.up.weight, std=init_std)
        nn.init.normal_(self.down.weight, std=output_init_std)
        self.activation = activation

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down(activate(self.activation, self.up(x_TD)))
