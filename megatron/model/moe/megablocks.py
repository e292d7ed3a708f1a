"""Optional GPU backend: Megablocks' grouped GEMM kernel and weight layout (CUDA only, imported lazily).

Shape legend: N rows, D hidden, F expert width, U up-projection width (F, or 2F gated), X either width,
E experts, G groups (experts) of a grouped GEMM.

Megablocks' grouped MLP stores `w1` and `w2` as [E*F, D] (megablocks/layers/mlp.py, SparseMLP), and
GroupedMLP views both as [E, F, D]: expert e's up-projection is `gmm(x, w1, trans_b=True)`, i.e.
`x @ w1[e].T`, and its down-projection `h @ w2[e]`. Its gated form (megablocks/layers/glu.py, GroupedGLU)
adds `v1`, also [E*F, D], and computes `act(x @ w1[e].T) * (x @ v1[e].T)`: w1 is the gate, v1 the value.
(Megablocks' default activation is tanh-approximated GELU; this backend uses the layer's own `activation`,
so both backends compute the same function.) Ours are `w_up_EDF` [E, D, F] (gated: [E, D, 2F], value
columns then gate columns) and `w_down_EFD` [E, F, D]; the functions below map an experts state dict either
way (the tests compare the backends with them; no tool converts checkpoint files). The LoRE term goes where the
native path puts it: between the first grouped GEMMs and the activation, on the [N, 2F] value-then-gate rows
when gated.

The kernel is `grouped_gemm.ops.gmm`, which Megablocks re-exports as `megablocks.grouped_gemm_util.ops.gmm`:
the grouped_gemm package alone is enough. It takes bf16 only (under bf16 autocast the operands are cast,
see kernels.py); other dtypes run torch's grouped_mm on the same weights.

Experts with biases (moe_use_bias_in_experts; Megablocks has none) keep the native `b_up_EU` [E, U] (value then
gate) and `b_down_ED` [E, D] under the same names, added to the gmm rows by the row's expert as the native
experts do; the conversions pass them through unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megatron.model.activations import Activation, as_activation, is_gated, up_width
from megatron.model.moe import kernels
from megatron.model.moe.experts import expert_of_rows, with_bias
from megatron.model.moe.init import normal_init_slice
from megatron.model.moe.kernels import grouped_matmul

NEEDS = ("moe_impl: megablocks needs CUDA and Megablocks' grouped GEMM kernel: pip install grouped_gemm "
         "(or pip install megablocks, which brings it but pins torch 2.7.0)")


def _rows(w_EDX: torch.Tensor) -> torch.Tensor:
    """[E, D, X] -> Megablocks' [E*X, D]."""
    e, d, x = w_EDX.shape
    return w_EDX.transpose(1, 2).reshape(e * x, d).contiguous()


def native_to_megablocks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith("w_up_EDF"):
            prefix = key.removesuffix("w_up_EDF")
            ffn = state[prefix + "w_down_EFD"].shape[1]
            if value.shape[2] == 2 * ffn:  # gated: value columns go to v1, gate columns to w1
                out[prefix + "v1"], out[prefix + "w1"] = _rows(value[:, :, :ffn]), _rows(value[:, :, ffn:])
            else:
                out[prefix + "w1"] = _rows(value)
        elif key.endswith("w_down_EFD"):
            e, f, d = value.shape
            out[key.removesuffix("w_down_EFD") + "w2"] = value.reshape(e * f, d).contiguous()
        else:
            out[key] = value
    return out


def megablocks_to_native(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    def native_up(w: torch.Tensor) -> torch.Tensor:  # [E*X, D] -> [E, D, X]
        return w.view(num_experts, w.shape[0] // num_experts, w.shape[1]).transpose(1, 2)

    out = {}
    for key, value in state.items():
        prefix = key.removesuffix(key.rsplit(".", 1)[-1])
        if key.endswith(".w1") or key == "w1":
            gate = native_up(value)
            value_half = state.get(prefix + "v1")
            w = gate if value_half is None else torch.cat([native_up(value_half), gate], dim=2)
            out[prefix + "w_up_EDF"] = w.contiguous()
        elif key.endswith(".w2") or key == "w2":
            ef, d = value.shape
            out[prefix + "w_down_EFD"] = value.view(num_experts, ef // num_experts, d).clone()
        elif not (key.endswith(".v1") or key == "v1"):
            out[key] = value
    return out


class MegablocksExperts(nn.Module):
    """Experts in Megablocks' layout, run with the grouped GEMMs of its dMoE grouped MLP / GLU (`gmm`)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str | Activation,
                 init_std: float, output_init_std: float, local_experts: range | None = None, bias: bool = False):
        super().__init__()
        self.gmm = kernels.load_gmm() if torch.cuda.is_available() else None
        if self.gmm is None:
            raise RuntimeError(NEEDS)
        local = range(num_experts) if local_experts is None else local_experts
        self.num_experts = len(local)  # held here; with expert parallelism a slice of the layer's experts
        # the same draws as the native layout (so a seed gives the same model on either backend), stored [E*F, D]
        f = ffn_hidden_size
        w_up_EDU = normal_init_slice((num_experts, hidden_size, up_width(activation, f)), init_std, local)
        w_down_EFD = normal_init_slice((num_experts, f, hidden_size), output_init_std, local)
        self.w1 = nn.Parameter(_rows(w_up_EDU[:, :, -f:]))  # the gate when gated, else the whole up-projection
        self.v1 = nn.Parameter(_rows(w_up_EDU[:, :, :f])) if is_gated(activation) else None
        self.w2 = nn.Parameter(w_down_EFD.reshape(-1, hidden_size).contiguous())
        self.b_up_EU = nn.Parameter(torch.zeros(len(local), w_up_EDU.shape[-1])) if bias else None
        self.b_down_ED = nn.Parameter(torch.zeros(len(local), hidden_size)) if bias else None
        self.act = as_activation(activation)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, lore=None, sources=None):
        view_EDF = lambda w: w.view(self.num_experts, -1, w.shape[-1]).transpose(1, 2)  # gmm(trans_b=True) on w
        w1_EDF, w2_EFD = view_EDF(self.w1), self.w2.view(self.num_experts, -1, self.w2.shape[-1])
        batch_sizes = None
        if kernels.gmm_available(x_ND, w1_EDF, kernels.compute_dtype(x_ND)):
            batch_sizes = tokens_per_expert_E.cpu()  # host sync: gmm takes the group sizes on the host
        grouped = lambda x, w: grouped_matmul(x, w, tokens_per_expert_E, gmm=self.gmm, gmm_batch_sizes_G=batch_sizes)
        expert_N = None if self.b_up_EU is None else expert_of_rows(tokens_per_expert_E, x_ND.shape[0])
        if self.v1 is None:
            up_rows = lambda x: grouped(x, w1_EDF)
        else:  # [value, gate] rows, the order activations.py and the LoRE term expect
            up_rows = lambda x: torch.cat([grouped(x, view_EDF(self.v1)), grouped(x, w1_EDF)], dim=-1)
        up = lambda x: with_bias(up_rows(x), self.b_up_EU, expert_N)
        down = lambda h: with_bias(grouped(h, w2_EFD), self.b_down_ED, expert_N)
        if lore is None:
            return down(self.act(up(x_ND))), None
        # the LoRE term lands between the first gmm and the activation, as in the native experts
        return lore(x_ND, tokens_per_expert_E, up, self.act, down, sources)  # a call: FSDP2 gathers its weights
