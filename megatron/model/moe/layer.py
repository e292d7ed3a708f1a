"""The MoE layer: route -> dispatch -> experts (+ LoREs) -> combine. No parallelism code lives here.

Shape legend: B batch, S sequence, T tokens, D hidden, F expert FFN width, E experts, M LoREs per expert.

Router (router.py), dispatcher (dispatcher.py), experts and shared experts (experts.py) and LoREs (lore.py)
are separate modules; the layer only wires them. With token dropping (capacity.py) the slots past their
expert's capacity are marked between routing and dispatch, and get no row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from megatron.model.activations import Activation
from megatron.model.moe.config import MoEArchitecture, MoERuntime
from megatron.model.moe.dispatcher import build_dispatcher
from megatron.model.moe.experts import GroupedExperts, SharedExperts
from megatron.model.moe.kernels import require_gmm, resolve_moe_impl
from megatron.model.moe.lore import LoREBank, LoREConfig
from megatron.model.moe.router import build_router


@dataclass
class MoEAux:
    """What an MoE layer hands back besides its output; losses are unweighted (the task weights them)."""

    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    lore_balancing_loss: torch.Tensor
    # Loads are counts, not shares: counts add up over micro-batches and ranks, so the logged shares and entropies
    # are the global batch's at any layout (training/lm_task.py's RoutingAccumulator)
    expert_slots_E: torch.Tensor  # token slots this rank routed to each expert (long; dropped ones too; detached)
    lore_slots_EM: torch.Tensor | None  # slots per (expert, LoRE) of the rows run here (long, detached); all-zero
    # rows for experts that got no rows here (with expert parallelism, every expert held on another rank)
    dispatch_stats: dict[str, float] = field(default_factory=dict)  # the exchange's (bytes, compression,
    # rows per EP rank) and, with token dropping, the share of slots dropped
    balance: BalanceCounts | None = None  # what the trainer's balancing bookkeeping reads (training only)


@dataclass
class BalanceCounts:
    """One micro-batch's choices, counted, for the balancing state kept between micro-batches and steps
    (megatron/training/balancing.py); `global_` ones are already summed over ranks (global-batch loss)."""

    expert_slots_E: torch.Tensor  # this rank's token slots per expert (long)
    global_expert_slots_E: torch.Tensor | None
    lore_slots_EM: torch.Tensor | None  # this rank's rows per (local expert, LoRE) (long)
    global_lore_slots_EM: torch.Tensor | None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. expert_bias_changed_fraction, as a
    # [part, whole] pair of counts that sums over micro-batches and ranks


def moe_param_counts(
    hidden_size: int, ffn_hidden_size: int, num_experts: int, lore: LoREConfig | None, gated: bool = False,
    shared: int = 0, biases: bool = False, router_bias: bool = False,
) -> dict[str, int]:
    """Closed-form parameter counts of one MoE layer: routed experts, LoREs, routers and `shared` shared
    experts (one MLP `shared` x F wide). Gated: the up-projections, and entangled LoREs' B, are 2x as wide.
    `biases`: every expert's two projections have biases (moe_use_bias_in_experts), the shared experts' too;
    `router_bias`: the router's linear has one (moe_router_bias)."""
    d, f, e = hidden_size, ffn_hidden_size, num_experts
    up = 2 * f if gated else f
    counts = {"experts": e * (d * (up + f) + (up + d if biases else 0)), "lores": 0,
              "routers": d * e + (e if router_bias else 0),
              "shared": shared * d * (up + f) + (shared * up + d if biases and shared else 0)}
    if lore is not None:
        m, r = lore.num_lores, lore.rank
        out = up if lore.mode != "standalone" else d
        counts["lores"] = e * m * r * (d + out)
        if lore.mode != "router_free":
            counts["routers"] += d * e * m
    return counts


class MoELayer(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str | Activation,
        init_std: float,
        output_init_std: float,
        arch: MoEArchitecture,
        runtime: MoERuntime | None = None,
    ):
        """`ffn_hidden_size` is the experts' width F, resolved (arch.ffn_hidden_size or the dense MLP's);
        `runtime` is this layer's own (MoERuntime.for_layer), None: one process, the kernels "auto" picks.
        With `runtime.expert_parallel`, this rank builds only its share of the experts (and their LoREs) and
        exchanges rows with the other EP ranks; the router and the shared experts stay whole (every rank
        routes its own tokens, and every token goes through the shared experts where it is)."""
        super().__init__()
        runtime = runtime or MoERuntime()
        num_experts = arch.num_experts
        expert_parallel = runtime.expert_parallel
        self.num_experts = num_experts
        self.local_experts = expert_parallel.local_experts(num_experts) if expert_parallel else range(num_experts)
        self.router = build_router(arch.router_type, hidden_size, num_experts, arch.top_k, arch.jitter_eps,
                                   arch.renormalize, arch.lbl_in_fp32, init_std, arch.score_function, arch.balancing,
                                   arch.num_groups, arch.group_top_k, arch.scaling_factor, arch.router_bias)
        # "auto" resolves here against this process's default device; a run passes the impl resolved for
        # its own device (build.py). An unknown name is a ValueError.
        impl = resolve_moe_impl(runtime.impl)
        if impl == "megablocks":
            from megatron.model.moe.megablocks import MegablocksExperts

            self.experts = MegablocksExperts(num_experts, hidden_size, ffn_hidden_size, activation, init_std,
                                             output_init_std, self.local_experts, bias=arch.expert_biases)
        else:  # native: torch's grouped_mm; grouped_gemm: the same experts on grouped_gemm's gmm
            self.experts = GroupedExperts(num_experts, hidden_size, ffn_hidden_size, activation, init_std,
                                          output_init_std, runtime.use_grouped_mm, self.local_experts,
                                          gmm=require_gmm() if impl == "grouped_gemm" else None,
                                          bias=arch.expert_biases)
        self.lore = (  # the LoRE B term runs on the experts' grouped kernel
            LoREBank.from_config(num_experts, hidden_size, ffn_hidden_size, arch.lore, init_std, self.local_experts,
                                 gmm=self.experts.gmm, activation=activation)
            if arch.lore else None
        )
        self.shared_experts = (SharedExperts(arch.num_shared_experts, hidden_size, ffn_hidden_size, activation,
                                             init_std, output_init_std, arch.expert_biases)
                               if arch.num_shared_experts else None)
        self.dispatcher = build_dispatcher(expert_parallel, num_experts, hidden_size, runtime.lsh)
        self.capacity = runtime.capacity

    @classmethod
    def build(cls, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int, activation: str = "gelu",
              init_std: float = 0.02, output_init_std: float = 0.02, **settings: Any) -> MoELayer:
        """Tests' and benchmarks' shorthand: `settings` are MoEArchitecture's and MoERuntime's fields by name.
        The model builds its layers with the constructor (gpt.py)."""
        runtime_names = {f.name for f in dataclasses.fields(MoERuntime)}
        runtime = MoERuntime(**{k: v for k, v in settings.items() if k in runtime_names})
        arch = MoEArchitecture(num_experts, top_k, **{k: v for k, v in settings.items() if k not in runtime_names})
        return cls(hidden_size, ffn_hidden_size, activation, init_std, output_init_std, arch, runtime)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD, num_sequences=x.shape[0] if x.dim() == 3 else 1)
        kept = None if self.capacity is None else self.capacity.keep(
            routing.expert_ids_TK, routing.weights_TK, self.num_experts, self.training)
        x_ND, tokens_per_local_expert_L, ctx = self.dispatcher.dispatch(x_TD, routing, kept)
        y_ND, lore_aux = self.experts(x_ND, tokens_per_local_expert_L, self.lore, ctx.sources)
        y_TD = self.dispatcher.combine(y_ND, ctx)
        y_TD = y_TD if self.shared_experts is None else y_TD + self.shared_experts(x_TD)
        zero = routing.z_loss.new_zeros(())
        aux = MoEAux(
            load_balancing_loss=routing.load_balancing_loss,
            z_loss=routing.z_loss,
            lore_balancing_loss=lore_aux["lore_balancing_loss"] if lore_aux else zero,
            expert_slots_E=routing.tokens_per_expert_E.detach(),
            lore_slots_EM=self._all_experts(lore_aux["lore_slots_EM"]) if lore_aux else None,
            dispatch_stats=ctx.stats if kept is None else {**ctx.stats, "dropped_fraction": kept.dropped_fraction},
            balance=self._balance_counts(routing, lore_aux) if self.training else None,
        )
        return y_TD.view_as(x), aux

    @staticmethod
    def _balance_counts(routing, lore_aux: dict | None) -> BalanceCounts:
        lore_aux = lore_aux or {}
        stats = {f"expert_{k}": v for k, v in routing.balance_stats.items()}
        stats |= {f"lore_{k}": v for k, v in lore_aux.get("balance_stats", {}).items()}
        return BalanceCounts(routing.tokens_per_expert_E, routing.global_counts_E, lore_aux.get("lore_slots_EM"),
                             lore_aux.get("lore_global_slots_EM"), stats)

    def expert_parts(self) -> list[nn.Module]:
        """The submodules whose parameters belong to experts: their leading dimension runs over
        `local_experts`, an equal block of rows per expert. Parallelism and checkpoints split them per expert.
        The shared experts are not among them: they are replicated like a dense MLP."""
        return [part for part in (self.experts, self.lore) if part is not None]

    def _all_experts(self, slots_LM: torch.Tensor | None) -> torch.Tensor | None:
        """The LoRE slots of this rank's experts placed in an [E, M] table (zero rows for other ranks' experts)."""
        return None if slots_LM is None else self.lore.to_all_experts(slots_LM).detach()
