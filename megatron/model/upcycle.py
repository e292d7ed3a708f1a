"""Sparse upcycling: a dense GPT into an MoE GPT, and an MoE GPT into StructMoE, computing the same function.

Shape legend: D hidden, F FFN width, E experts.

dense -> MoE: every expert of an MoE layer is a copy of that layer's dense MLP (`w_up_EDF[e] = up.weight.T`,
`w_down_EFD[e] = down.weight.T`) and the router is a small random draw. The layer's output is
`sum_k g_k expert_k(x) = (sum_k g_k) mlp(x)`, so it equals the dense MLP exactly when the top-k gates sum
to 1: `moe_renormalize_weights: true` (with top-1 the gate is then exactly 1). Experts have no biases, so
a dense MLP with non-zero biases cannot be upcycled exactly and is refused.

MoE -> StructMoE: the LoREs are added with B = 0, so every LoRE term `pi (x A) B` is zero at step 0. Then
dL/dB = pi (x A)^T dL/dH is non-zero (A is random), while dL/dA and dL/d(LoRE router) both carry a factor
B and are zero: the first update moves B only, and A and the LoRE router start learning from step 2 on.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megatron.model.gpt import GPT
from megatron.model.moe import MoELayer


class UpcycleError(ValueError):
    pass


def _dense_parts(mlp: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_up [D, F'], w_down [F, D]) of a dense MLP in the experts' layout; refuses non-zero biases."""
    for name in ("up", "down"):
        bias = getattr(getattr(mlp, name), "bias", None)
        if bias is not None and bool(bias.detach().ne(0).any()):
            raise UpcycleError(f"use_bias_in_mlp: layer {layer}'s dense MLP has non-zero biases, which experts cannot "
                               "hold (an exact upcycle needs a dense model trained with use_bias_in_mlp: false)")
    return mlp.up.weight.detach().T, mlp.down.weight.detach().T


def upcycle_weights(src: GPT, dst: GPT, router_std: float, generator: torch.Generator | None = None) -> list[str]:
    """Fills `dst` (an MoE/StructMoE GPT) from `src` (dense or MoE) in place; returns the tensors left
    as initialised (routers of new MoE layers are redrawn with `router_std`, LoRE A and routers stay)."""
    src_state, dst_state = src.state_dict(), dst.state_dict()
    new = dict.fromkeys(dst_state, False)
    with torch.no_grad():
        for name, value in dst_state.items():
            if name in src_state:
                if src_state[name].shape != value.shape:
                    raise UpcycleError(f"{name}: source {list(src_state[name].shape)}, target {list(value.shape)}")
                value.copy_(src_state[name])
                new[name] = True
        for i, (src_block, dst_block) in enumerate(zip(src.blocks, dst.blocks, strict=True)):
            layer = dst_block.mlp
            if not isinstance(layer, MoELayer):
                continue
            prefix = f"blocks.{i}.mlp."
            if not isinstance(src_block.mlp, MoELayer):
                if not layer.router.renormalize:
                    raise UpcycleError("moe_renormalize_weights: false; the top-k gates must sum to 1 for the copied "
                                       "experts to give the dense MLP's output (expected true)")
                up_DF, down_FD = _dense_parts(src_block.mlp, i)
                for target, weight in ((layer.experts.w_up_EDF, up_DF), (layer.experts.w_down_EFD, down_FD)):
                    if target.shape[1:] != weight.shape:
                        raise UpcycleError(f"layer {i}: dense MLP {list(weight.shape)} cannot fill experts "
                                           f"{list(target.shape)} (moe_ffn_hidden_size must be the dense width)")
                    target.copy_(weight.expand_as(target))
                torch.nn.init.normal_(layer.router.gate.weight, std=router_std, generator=generator)
                new.update({f"{prefix}experts.w_up_EDF": True, f"{prefix}experts.w_down_EFD": True})
            if layer.lore is not None and not new[f"{prefix}lore.B"]:
                layer.lore.B.zero_()  # the LoRE terms start at zero
                new[f"{prefix}lore.B"] = True
    dropped = sorted(set(src_state) - set(dst_state) - {n for n in src_state if ".mlp.up." in n or ".mlp.down." in n})
    if dropped:
        raise UpcycleError(f"{dropped[0]}: the target model has no place for this source tensor ({len(dropped)} such)")
    return sorted(name for name, done in new.items() if not done)


def check_exact(args) -> None:
    """Target settings under which no upcycled model computes the source's function (the gate
    normalisation is checked per layer, where a dense MLP is copied)."""
    if getattr(args, "moe_router_type", "topk") != "topk":
        raise UpcycleError(f"moe_router_type: {args.moe_router_type}; upcycling needs the top-k router")
    if getattr(args, "moe_num_shared_experts", 0):
        raise UpcycleError("moe_num_shared_experts: shared experts would add a second copy of the MLP (expected 0)")
