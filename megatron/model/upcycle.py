"""Sparse upcycling: a dense GPT into an MoE GPT (whole or granular experts), and an MoE GPT into StructMoE,
computing the same function.

Shape legend: D hidden, F dense FFN width, f = F / G an expert's width, U the up-projection's width (f, or 2f
gated), E routed experts, G shards per dense MLP (granularity), R = G - S routed shards (S shared).

dense -> MoE (granular upcycling, He et al. 2024's virtual groups): each dense MLP is cut along its
intermediate dimension into G shards of width f = F / G (a gated MLP's value and gate columns alike), and
`down(act(up x)) = sum_s shard_s(x)` exactly, whatever the elementwise activation. The first S shards become
the shared expert (moe_num_shared_experts: S, one always-on MLP S f wide); the other R = G - S are the routed
experts, laid out in E / R virtual groups of R consecutive experts holding shards S .. G-1 once each
(expert e holds shard S + e % R). Every expert of a group gets the same router row (a small random draw per
group), so the experts of a group have equal scores and the top-k takes whole groups when k is a multiple of R.
With the chosen gates summing to s (moe_renormalize_weights or sigmoid scores: s = 1, times
moe_router_scaling_factor where the router has one), a group's R equal gates sum to its share of s and

    routed(x) = sum over chosen groups (share_j / R) sum_{shard r} (R / s) shard_r(x) = sum_{r >= S} shard_r(x)

once every routed down-projection is multiplied by R / s: the upcycled layer equals the dense MLP exactly
(with group-limited routing, when each router group holds whole virtual groups). The one exception is a tie
between two groups' scores in fp32, where top-k may take part of each (benchmarks/upcycle_granular.py counts
them). G = 1 is classic sparse upcycling (every expert a copy of the MLP, R = 1, no scaling). With top-k not a
multiple of R a token sees only part of its MLP, and with a raw softmax (gates not renormalised) s varies by
token (it is taken as k / E, its value at a uniform router: the paper's scaling); both upcycle only when asked
(`allow_inexact`), and their step-0 gap is measured by the benchmark.
Biases: a dense MLP's non-zero biases need experts with biases (moe_use_bias_in_experts); each shard then takes
its slice of the up-projection's bias, and the down-projection's bias is added once, by the shared expert or as
b / s on every routed expert (the chosen gates sum to s). Without expert biases they are refused.

MoE -> StructMoE: the LoREs are added with B = 0, so every LoRE term `pi (x A) B` is zero at step 0. Then
dL/dB = pi (x A)^T dL/dH is non-zero (A is random), while dL/dA and dL/d(LoRE router) both carry a factor
B and are zero: the first update moves B only, and A and the LoRE router start learning from step 2 on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from megatron.model.gpt import GPT
from megatron.model.moe import MoELayer


class UpcycleError(ValueError):
    pass


@dataclass(frozen=True)
class Shards:
    """How one dense MLP of width F becomes an MoE layer: G shards, S of them shared, E routed experts."""

    width: int  # F, the dense MLP's
    granularity: int  # G
    shared: int  # S: shards 0 .. S-1 form the shared expert
    num_experts: int  # E routed experts, E / R copies of each routed shard

    @property
    def routed(self) -> int:
        """R: shards per virtual group (shards S .. G-1)."""
        return self.granularity - self.shared

    @property
    def shard_width(self) -> int:
        return self.width // self.granularity

    def describe(self) -> str:
        f, r = self.shard_width, self.routed
        if self.granularity == 1:
            return f"each of the {self.num_experts} experts a copy of the dense MLP (width {self.width})"
        shared = f"shards 0-{self.shared - 1} the shared expert, " if self.shared > 1 else ""
        shared = "shard 0 the shared expert, " if self.shared == 1 else shared
        return (f"granularity {self.granularity}: the dense width {self.width} cut into {self.granularity} shards of "
                f"{f}, {shared}{r} routed shards x {self.num_experts // r} virtual groups = {self.num_experts} experts")


def shard_plan(width: int, expert_width: int, num_experts: int, num_shared: int) -> Shards:
    """The granular layout of a dense MLP of `width` into experts of `expert_width`; refuses what cannot be built."""
    if expert_width > width or width % expert_width:
        raise UpcycleError(f"moe_ffn_hidden_size {expert_width}: the dense MLP's width {width} is not a multiple of it "
                           "(granularity = dense width / moe_ffn_hidden_size must be a whole number)")
    granularity = width // expert_width
    if num_shared >= granularity:
        raise UpcycleError(f"moe_num_shared_experts {num_shared}: granularity {granularity} cuts each MLP into "
                           f"{granularity} shard(s), which leaves no routed shard (expected < {granularity})")
    routed = granularity - num_shared
    if num_experts % routed:
        raise UpcycleError(f"moe_num_experts {num_experts}: not a multiple of the {routed} routed shards per MLP "
                           f"(granularity {granularity}, {num_shared} shared): each virtual group holds all of them")
    return Shards(width, granularity, num_shared, num_experts)


def inexact_reasons(plan: Shards, router: nn.Module) -> list[str]:
    """Why the upcycled layer would not compute the dense MLP at step 0 (empty: it does, exactly)."""
    reasons = []
    if not router.renormalize:
        reasons.append("moe_renormalize_weights: false; the top-k gates must sum to 1 for the copied shards to give "
                       "the dense MLP's output (expected true)")
    if router.top_k % plan.routed:
        reasons.append(f"moe_top_k {router.top_k}: not a multiple of the {plan.routed} routed shards per virtual "
                       "group, so a token would miss part of its MLP")
    groups = getattr(router, "num_groups", 1)
    if groups > 1 and (plan.num_experts // groups) % plan.routed:
        reasons.append(f"moe_router_num_groups {groups}: router groups of {plan.num_experts // groups} expert(s) split "
                       f"the virtual groups of {plan.routed} (expected a multiple of {plan.routed} experts per group)")
    return reasons


def chosen_gate_sum(router: nn.Module) -> float:
    """s, what the chosen gates sum to: 1 when renormalised, k / E (a uniform router's) for a raw softmax; times the
    router's scaling factor where it has one."""
    scaling = float(getattr(router, "scaling_factor", 1.0))
    return scaling if router.renormalize else scaling * router.top_k / router.gate.weight.shape[0]


def _dense_parts(mlp: nn.Module, layer: int, biases: bool) -> tuple[torch.Tensor, ...]:
    """(up.weight [U, D], down.weight [D, F], up.bias [U], down.bias [D]) of a dense MLP (absent biases as zeros);
    non-zero biases are refused unless the experts have biases (`biases`) to hold them."""
    up, down = mlp.up, mlp.down
    parts = [up.weight.detach(), down.weight.detach()]
    for linear in (up, down):
        bias = linear.bias.detach() if linear.bias is not None else linear.weight.new_zeros(linear.weight.shape[0])
        if not biases and bool(bias.ne(0).any()):
            raise UpcycleError(f"use_bias_in_mlp: layer {layer}'s dense MLP has non-zero biases, which the experts "
                               "cannot hold (expected moe_use_bias_in_experts: true, or a dense model trained with "
                               "use_bias_in_mlp: false)")
        parts.append(bias)
    return tuple(parts)


def cut_shards(up_UD: torch.Tensor, down_DF: torch.Tensor, granularity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The G shards of a dense MLP in the experts' layout: (up [G, D, U/G], down [G, F/G, D]). A gated up-projection
    ([value; gate] rows, activations.py) gives each shard its value rows and its gate rows, in that order; an
    up-projection's bias [U] is cut the same way as `up_UD[:, None]`."""
    width = down_DF.shape[1]
    halves = up_UD.split(width, dim=0)  # (value,) or (value, gate), each [F, D]
    up_GfD = torch.cat([h.reshape(granularity, width // granularity, -1) for h in halves], dim=1)
    return up_GfD.transpose(1, 2), down_DF.T.reshape(granularity, width // granularity, -1)


def first_shards(up_UD: torch.Tensor, width: int, columns: int) -> torch.Tensor:
    """The rows of an up-projection (or its bias) for the first `columns` of the width: value rows, then gate rows."""
    return torch.cat([h[:columns] for h in up_UD.split(width, dim=0)])


def _fill_from_dense(layer: MoELayer, mlp: nn.Module, i: int, router_std: float, generator: torch.Generator | None,
                     allow_inexact: bool) -> list[str]:
    """Layer `i`'s experts, shared expert and router from its dense MLP; returns the names filled."""
    experts, router, shared = layer.experts, layer.router, layer.shared_experts
    biases = getattr(experts, "b_up_EU", None) is not None
    up_UD, down_DF, b_up_U, b_down_D = _dense_parts(mlp, i, biases)
    width, expert_width = down_DF.shape[1], experts.w_down_EFD.shape[1]
    num_shared = 0 if shared is None else shared.down.weight.shape[1] // expert_width
    plan = shard_plan(width, expert_width, layer.num_experts, num_shared)
    if up_UD.shape[0] // width != experts.w_up_EDF.shape[2] // expert_width:
        raise UpcycleError(f"layer {i}: the dense MLP and the experts differ in gating (activation)")
    reasons = inexact_reasons(plan, router)
    if reasons and not allow_inexact:
        raise UpcycleError(f"{reasons[0]} (--allow-inexact upcycles anyway, with a step-0 gap)")
    gate_sum = chosen_gate_sum(router)
    up_GDU, down_GFD = cut_shards(up_UD, down_DF, plan.granularity)
    shard_of = plan.shared + torch.tensor(list(layer.local_experts)) % plan.routed  # expert e: shard S + e % R
    experts.w_up_EDF.copy_(up_GDU[shard_of])
    experts.w_down_EFD.copy_(down_GFD[shard_of] * (plan.routed / gate_sum))
    filled = ["experts.w_up_EDF", "experts.w_down_EFD", "router.gate.weight"]
    if biases:  # up: each shard's slice; down: added once, by the shared expert or spread over gates summing to s
        experts.b_up_EU.copy_(cut_shards(b_up_U[:, None], down_DF, plan.granularity)[0][shard_of, 0])
        share = 0.0 if shared is not None else 1.0 / gate_sum
        experts.b_down_ED.copy_((b_down_D * share).expand_as(experts.b_down_ED))
        filled += ["experts.b_up_EU", "experts.b_down_ED"]
    if shared is not None:  # shards 0 .. S-1, side by side, as one MLP S f wide
        columns = num_shared * expert_width
        shared.up.weight.copy_(first_shards(up_UD, width, columns))
        shared.down.weight.copy_(down_DF[:, :columns])
        filled += ["shared_experts.up.weight", "shared_experts.down.weight"]
        if shared.up.bias is not None:
            shared.up.bias.copy_(first_shards(b_up_U, width, columns))
            shared.down.bias.copy_(b_down_D)
            filled += ["shared_experts.up.bias", "shared_experts.down.bias"]
        elif bool(b_up_U.ne(0).any() or b_down_D.ne(0).any()):
            raise UpcycleError(f"layer {i}: the shared expert has no biases to hold the dense MLP's")
    # one small random row per virtual group, repeated for its R experts: equal scores inside a group
    rows = router.gate.weight.shape[0] // plan.routed
    drawn = torch.empty(rows, router.gate.weight.shape[1]).normal_(0.0, router_std, generator=generator)
    router.gate.weight.copy_(drawn.repeat_interleave(plan.routed, dim=0))
    if router.gate.bias is not None:
        router.gate.bias.zero_()
        filled.append("router.gate.bias")
    return filled


def upcycle_weights(src: GPT, dst: GPT, router_std: float, generator: torch.Generator | None = None,
                    allow_inexact: bool = False) -> list[str]:
    """Fills `dst` (an MoE/StructMoE GPT) from `src` (dense or MoE) in place; returns the tensors left
    as initialised (routers of new MoE layers are drawn with `router_std`, LoRE A and routers stay).
    Dense MLPs are cut into dst's experts' width (module docstring); a target whose step-0 function would
    differ is refused unless `allow_inexact`."""
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
                filled = _fill_from_dense(layer, src_block.mlp, i, router_std, generator, allow_inexact)
                new.update({prefix + name: name != "router.gate.weight" for name in filled})
            if layer.lore is not None and not new[f"{prefix}lore.B"]:
                layer.lore.B.zero_()  # the LoRE terms start at zero
                new[f"{prefix}lore.B"] = True
    dropped = sorted(set(src_state) - set(dst_state) - {n for n in src_state if ".mlp.up." in n or ".mlp.down." in n})
    if dropped:
        raise UpcycleError(f"{dropped[0]}: the target model has no place for this source tensor ({len(dropped)} such)")
    return sorted(name for name, done in new.items() if not done)


def check_exact(args) -> None:
    """Target settings under which no upcycled model computes the source's function (the layout and the gates
    are checked per layer, where a dense MLP is cut)."""
    if getattr(args, "moe_router_type", "topk") != "topk":
        raise UpcycleError(f"moe_router_type: {args.moe_router_type}; upcycling needs the top-k router")
