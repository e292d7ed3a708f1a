"""Optional GPU backend: Megablocks' grouped GEMM kernel and weight layout (CUDA only, imported lazily).

Megablocks' grouped MLP stores `w1` and `w2` as [E*F, D]: expert e's up-projection is `x @ w1[e].T`
and its down-projection `h @ w2[e]` (megablocks/layers/mlp.py, GroupedMLP). Ours are `w_up_EDF`
[E, D, F] and `w_down_EFD` [E, F, D]; the functions below convert a state dict either way, so a
checkpoint moves between backends. The LoRE term goes where the native path puts it: between the first
grouped GEMM and the activation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megatron.model.moe.experts import ACTIVATIONS

NEEDS = "moe_impl: megablocks needs CUDA and the megablocks package (pip install megablocks; it pins torch 2.7.0)"


def native_to_megablocks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith("w_up_EDF"):
            e, d, f = value.shape
            out[key.removesuffix("w_up_EDF") + "w1"] = value.transpose(1, 2).reshape(e * f, d).contiguous()
        elif key.endswith("w_down_EFD"):
            e, f, d = value.shape
            out[key.removesuffix("w_down_EFD") + "w2"] = value.reshape(e * f, d).contiguous()
        else:
            out[key] = value
    return out


def megablocks_to_native(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith(".w1") or key == "w1":
            ef, d = value.shape
            w = value.view(num_experts, ef // num_experts, d)
            out[key.removesuffix("w1") + "w_up_EDF"] = w.transpose(1, 2).contiguous()
        elif key.endswith(".w2") or key == "w2":
            ef, d = value.shape
            out[key.removesuffix("w2") + "w_down_EFD"] = value.view(num_experts, ef // num_experts, d).clone()
        else:
            out[key] = value
    return out


class MegablocksExperts(nn.Module):
    """Experts in Megablocks' layout, run with its grouped GEMM (`grouped_gemm.ops.gmm`)."""

    def __init__(self, num_experts, hidden_size, ffn_hidden_size, activation, init_std, output_init_std):
        super().__init__()
        if not torch.cuda.is_available():
            raise RuntimeError(NEEDS)
        try:
            import megablocks  # noqa: F401
            from grouped_gemm import ops
        except ImportError as err:
            raise RuntimeError(NEEDS) from err
        self.gmm = ops.gmm
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.randn(num_experts * ffn_hidden_size, hidden_size) * init_std)
        self.w2 = nn.Parameter(torch.randn(num_experts * ffn_hidden_size, hidden_size) * output_init_std)
        self.act = ACTIVATIONS[activation]

    def forward(self, x_ND, tokens_per_expert_E, lore=None):
        batch_sizes = tokens_per_expert_E.cpu()
        plan = lore.plan(x_ND, tokens_per_expert_E) if lore is not None else None
        if plan is not None and plan.row_order_N is not None:
            x_ND = x_ND.index_select(0, plan.row_order_N)
        w1 = self.w1.view(self.num_experts, -1, self.w1.shape[-1])
        w2 = self.w2.view(self.num_experts, -1, self.w2.shape[-1])
        h_NF = self.gmm(x_ND, w1, batch_sizes, trans_b=True)
        if lore is not None and lore.entangled:
            h_NF = h_NF + lore.delta(x_ND, plan)
        y_ND = self.gmm(self.act(h_NF), w2, batch_sizes)
        if lore is not None and not lore.entangled:
            y_ND = y_ND + lore.delta(x_ND, plan)
        if plan is not None and plan.row_order_N is not None:
            y_ND = torch.empty_like(y_ND).index_copy(0, plan.row_order_N, y_ND)
        return y_ND, plan.aux if plan is not None else None
