"""Optional GPU backend: Megablocks' grouped GEMM kernel and weight layout (CUDA only, imported lazily).

Megablocks' grouped MLP stores `w1` and `w2` as [E*F, D] (megablocks/layers/mlp.py, SparseMLP), and
GroupedMLP views both as [E, F, D]: expert e's up-projection is `gmm(x, w1, trans_b=True)`, i.e.
`x @ w1[e].T`, and its down-projection `h @ w2[e]`. (Megablocks' default activation is tanh-approximated
GELU; this backend uses the layer's own `activation`, so both backends compute the same function.) Ours are `w_up_EDF`
[E, D, F] and `w_down_EFD` [E, F, D]; the functions below convert a state dict either way, so a
checkpoint moves between backends. The LoRE term goes where the native path puts it: between the first
grouped GEMM and the activation.

The kernel is `grouped_gemm.ops.gmm`, which Megablocks re-exports as `megablocks.grouped_gemm_util.ops.gmm`:
the grouped_gemm package alone is enough. It takes bf16 only (under bf16 autocast the operands are cast,
see kernels.py); other dtypes run torch's grouped_mm on the same weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megatron.model.moe import kernels
from megatron.model.moe.experts import ACTIVATIONS, normal_init_slice
from megatron.model.moe.kernels import grouped_matmul

NEEDS = ("moe_impl: megablocks needs CUDA and Megablocks' grouped GEMM kernel: pip install grouped_gemm "
         "(or pip install megablocks, which brings it but pins torch 2.7.0)")


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
    """Experts in Megablocks' layout, run with the grouped GEMM of its dMoE grouped MLP (`gmm`)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str,
                 init_std: float, output_init_std: float, local_experts: range | None = None):
        super().__init__()
        self.gmm = kernels.load_gmm() if torch.cuda.is_available() else None
        if self.gmm is None:
            raise RuntimeError(NEEDS)
        local = range(num_experts) if local_experts is None else local_experts
        self.num_experts = len(local)  # held here; with expert parallelism a slice of the layer's experts
        # the same draws as the native layout (so a seed gives the same model on either backend), stored [E*F, D]
        w_up_EDF = normal_init_slice((num_experts, hidden_size, ffn_hidden_size), init_std, local)
        w_down_EFD = normal_init_slice((num_experts, ffn_hidden_size, hidden_size), output_init_std, local)
        self.w1 = nn.Parameter(w_up_EDF.transpose(1, 2).reshape(-1, hidden_size).contiguous())
        self.w2 = nn.Parameter(w_down_EFD.reshape(-1, hidden_size).contiguous())
        self.act = ACTIVATIONS[activation]

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, lore=None, sources=None):
        w1_EDF = self.w1.view(self.num_experts, -1, self.w1.shape[-1]).transpose(1, 2)  # gmm(trans_b=True) on w1
        w2_EFD = self.w2.view(self.num_experts, -1, self.w2.shape[-1])
        batch_sizes = None
        if kernels.gmm_available(*kernels.autocast_operands(x_ND, w1_EDF)):
            batch_sizes = tokens_per_expert_E.cpu()  # host sync: gmm takes the group sizes on the host
        up = lambda x: grouped_matmul(x, w1_EDF, tokens_per_expert_E, gmm=self.gmm, gmm_batch_sizes_G=batch_sizes)
        down = lambda h: grouped_matmul(h, w2_EFD, tokens_per_expert_E, gmm=self.gmm, gmm_batch_sizes_G=batch_sizes)
        if lore is None:
            return down(self.act(up(x_ND))), None
        # the LoRE term lands between the first gmm and the activation, as in the native experts
        return lore(x_ND, tokens_per_expert_E, up, self.act, down, sources)  # a call: FSDP2 gathers its weights
